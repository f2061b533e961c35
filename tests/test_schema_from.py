"""rehearse --schema-from: an application's schema loaded from a file or a database,
the rehearsal on it with smoke writes, and its reports as Markdown, JSON and JUnit."""

from __future__ import annotations

import json
import stat
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from psycopg2.extensions import parse_dsn

from migration.cli import main
from migration.connection import connected
from migration.rehearsal import schema_source
from migration.rehearsal.sandbox import Sandbox
from migration.rehearsal.schema_source import (
    SchemaSourceError,
    choose_pg_dump,
    load_schema,
    split_statements,
)

KEYCLOAK = Path(__file__).resolve().parent.parent / "fixtures" / "keycloak.sql"


@pytest.fixture
def empty_db(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[str]:
    """Owner DSN of a fresh empty database."""
    name = f"sf_{request.node.name[:40].lower()}".replace("[", "_").replace("]", "")
    with sandbox.database(name, variant=None) as dsn:
        yield dsn


def _tables(dsn: str) -> set[str]:
    with connected(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT schemaname || '.' || tablename FROM pg_tables "
                    "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')")
        return {name for (name,) in cur.fetchall()}


# --- reading SQL ---------------------------------------------------------------------------------

def test_statements_are_split_outside_quotes_comments_and_dollar_quotes() -> None:
    text = ("\\restrict Zx8\n-- a comment; not a statement\nSET statement_timeout = 0;\n"
            "CREATE FUNCTION f() RETURNS trigger AS $body$BEGIN NEW.a := 'x;'; RETURN NEW; "
            "END$body$ LANGUAGE plpgsql;\n"
            "/* block; /* nested; */ */ SELECT 'it''s;', E'\\';', \"odd;name\";\n"
            "\\connect app\nSELECT a$1$b;\n\\unrestrict Zx8\n")
    statements, skipped = split_statements(text)
    assert [(s.line, s.text[:20]) for s in statements] == [
        (3, "SET statement_timeou"), (4, "CREATE FUNCTION f() "), (5, "SELECT 'it''s;', E'\\"),
        (7, "SELECT a$1$b;")]
    assert skipped == ["line 1: psql meta-command \\restrict", "line 6: psql meta-command "
                       "\\connect", "line 8: psql meta-command \\unrestrict"]


def test_another_meta_command_is_refused_naming_its_line() -> None:
    with pytest.raises(SchemaSourceError,
                       match=r"app\.sql, line 2: psql meta-command \\i is not"):
        split_statements("SELECT 1;\n\\i other.sql\n", "app.sql")


def _fake_pg_dump(folder: Path, major: int) -> Path:
    folder.mkdir()
    binary = folder / "pg_dump"
    binary.write_text(f"#!/bin/sh\necho 'pg_dump (PostgreSQL) {major}.2'\n")
    binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
    return binary


def test_the_pg_dump_chosen_is_the_oldest_not_older_than_the_server(tmp_path: Path) -> None:
    found = [_fake_pg_dump(tmp_path / str(major), major) for major in (18, 15, 16)]
    assert choose_pg_dump(15, found) == found[1]
    assert choose_pg_dump(16, found) == found[2]
    with pytest.raises(SchemaSourceError, match="no pg_dump of PostgreSQL 19 or newer"):
        choose_pg_dump(19, found)


# --- loading -------------------------------------------------------------------------------------

def test_keycloak_file_loads(empty_db: str) -> None:
    loaded = load_schema(str(KEYCLOAK), empty_db)
    assert loaded.skipped == []
    assert len(_tables(empty_db)) == 16
    with connected(empty_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_constraint WHERE contype = 'f' "
                    "AND confrelid = 'public.user_entity'::regclass")
        assert (cur.fetchone() or [0])[0] == 7


def test_ownership_privileges_and_unknown_settings_are_left_out(tmp_path: Path,
                                                               empty_db: str) -> None:
    schema = tmp_path / "app.sql"
    schema.write_text("SET no_such_setting_anywhere = 1;\n"
                      "CREATE TABLE accounts (uuid varchar(36) PRIMARY KEY);\n"
                      "ALTER TABLE public.accounts OWNER TO ghost_owner;\n"
                      "GRANT SELECT ON accounts TO ghost_reader;\n"
                      "REVOKE ALL ON accounts FROM PUBLIC;\n")
    loaded = load_schema(str(schema), empty_db)
    assert loaded.applied == 1
    assert [line.split(":")[0] for line in loaded.skipped] == [
        "line 1", "line 3", "line 4", "line 5"]
    assert _tables(empty_db) == {"public.accounts"}


def test_a_statement_that_fails_is_named(tmp_path: Path, empty_db: str) -> None:
    schema = tmp_path / "broken.sql"
    schema.write_text("CREATE TABLE a (id varchar(36) PRIMARY KEY);\n\n"
                      "-- the migration that went wrong\n"
                      "CREATE TABLE b (a_id varchar(36) REFERENCES missing (id));\n")
    with pytest.raises(SchemaSourceError) as caught:
        load_schema(str(schema), empty_db)
    message = caught.value.message
    assert message.startswith(f"{schema}, line 4: CREATE TABLE b (a_id varchar(36) "
                              "REFERENCES missing (id));: ")
    assert 'relation "missing" does not exist' in message


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SchemaSourceError, match="no such file"):
        load_schema(str(tmp_path / "nope.sql"), "dbname=unused")


def test_schema_from_a_database_keeps_the_password_out_of_sight(
        legacy_db: str, empty_db: str, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    password = parse_dsn(legacy_db)["password"]
    commands: list[list[str]] = []
    real = subprocess.run

    def recording(argv: list[str], **kwargs: Any) -> Any:
        commands.append(list(argv))
        return real(argv, **kwargs)

    monkeypatch.setattr(schema_source.subprocess, "run", recording)
    loaded = load_schema(legacy_db, empty_db)
    assert _tables(empty_db) == _tables(legacy_db)
    assert password not in loaded.origin
    assert not any(password in arg for argv in commands for arg in argv)
    assert any("--no-owner" in argv for argv in commands)

    wrong = legacy_db.replace(password, password + "x")
    with pytest.raises(SchemaSourceError) as caught:
        load_schema(wrong, empty_db)
    assert password not in str(caught.value)
    out, err = capfd.readouterr()
    assert password not in out + err


# --- the report's files --------------------------------------------------------------------------

def test_report_format_follows_the_suffix(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--operation=rehearse", "--report", "out.txt",
                                       "--log-file", str(tmp_path / "log")])
    assert result.exit_code == 2, result.output
    assert ".md (Markdown), .json (JSON), .xml (JUnit XML)" in result.output


def test_schema_from_belongs_to_rehearse() -> None:
    result = CliRunner().invoke(main, ["--operation=status", "--schema-from", "x.sql",
                                       "--database-url", "postgresql://nobody@127.0.0.1/x"])
    assert result.exit_code == 2
    assert "--schema-from belongs to --operation=rehearse" in result.output


def parse_reports(folder: Path) -> tuple[str, dict[str, Any], ET.Element]:
    """The Markdown, JSON and JUnit reports a rehearsal wrote in ``folder``."""
    return ((folder / "r.md").read_text(), json.loads((folder / "r.json").read_text()),
            ET.parse(folder / "r.xml").getroot())
