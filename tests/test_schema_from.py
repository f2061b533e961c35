"""rehearse --schema-from: an application's schema loaded from a file or a database,
the rehearsal on it with smoke writes, and its reports as Markdown, JSON and JUnit."""

from __future__ import annotations

import json
import shlex
import stat
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import psycopg2
import pytest
from click.testing import CliRunner
from psycopg2.extensions import parse_dsn

from migration.cli import main
from migration.connection import connected
from migration.plan import build_plan, parse_key
from migration.preflight import validate_schema
from migration.rehearsal import rehearse as rehearse_module
from migration.rehearsal import schema_source
from migration.rehearsal.generate import GenerateError, populate
from migration.rehearsal.inventory import inventory
from migration.rehearsal.rehearse import STAGES, RehearsalOptions, parse_production_rows, rehearse
from migration.rehearsal.report import Report, write_report
from migration.rehearsal.sandbox import Sandbox
from migration.rehearsal.schema_source import (
    SchemaSourceError,
    choose_pg_dump,
    load_schema,
    split_statements,
)
from migration.report import Finding, Status
from migration.session import Session, Settings
from tests.operate import run_ok

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


# --- whole rehearsals on schemas the project did not design --------------------------------------

def _rehearse_on(sandbox: Sandbox, source: str, key: str, **kwargs: Any) -> Report:
    """A rehearsal on scratch databases of the test server (its version is the one tested)."""
    options = RehearsalOptions(schema_from=source, key=parse_key(key), **kwargs)
    return rehearse(sandbox.admin_dsn_for("postgres"), options)


@pytest.fixture(scope="module")
def keycloak_report(sandbox: Sandbox) -> Report:
    return _rehearse_on(sandbox, str(KEYCLOAK), "public.user_entity.id", users=200,
                        batch_sizes=(100,))


@pytest.mark.once
def test_keycloak_rehearsal_passes_with_smoke_writes(keycloak_report: Report,
                                                     tmp_path: Path) -> None:
    report = keycloak_report
    assert report.problems() == []
    assert report.key == "public.user_entity.id"
    assert {p.check for p in report.planted} >= {"invalid_uuid", "collision", "non_canonical"}
    assert all(p.found for p in report.planted)
    # the orphans were planted past foreign keys: removed, none left to quarantine
    assert [r.stage for r in report.rollbacks] == [s for s in STAGES if s != "quarantine"]
    assert all(r.passed for r in report.rollbacks)
    # smoke writes after every rollback and after the final migration, on every plan table
    assert [run.after for run in report.smoke] == [
        *(f"rollback from {r.stage}" for r in report.rollbacks), "full_migration"]
    final = report.smoke[-1]
    assert {w.table for w in final.writes} == {
        f"public.{t}" for t in ("user_entity", "credential", "user_attribute",
                                "user_role_mapping", "user_group_membership",
                                "federated_identity", "user_consent", "user_required_action")}
    assert {w.operation for w in final.writes} == {"insert", "update", "delete"}
    assert not any(run.broken(w) for run in report.smoke for w in run.writes)
    # the varchar binding breaks after the swap: reported, not failed
    assert any(final.compatibility(w) for w in final.writes)
    assert "stringtype=unspecified" in " ".join(report.compatibility_notes())
    # what depends on the key: all carried, and named
    carried = {d.what.split(" on ")[0] for d in report.dependents if d.carried}
    assert {"primary key constraint_fb", "foreign key fk_grntcsnt_user",
            "unique constraint uk_local_consent", "primary key constraint_c",
            "index idx_user_reqactions"} <= carried
    assert not [d for d in report.dependents if not d.carried]

    for suffix in (".md", ".json", ".xml"):
        write_report(tmp_path / f"r{suffix}", report)
    markdown, data, junit = parse_reports(tmp_path)
    assert markdown.startswith("# UUID migration rehearsal: PASSED")
    assert "## Smoke writes after full_migration, those refused" in markdown
    assert "| rollback from migrate_users | 48 | 0 | 0 |" in markdown
    assert "## Objects depending on the key columns: carried or refused" in markdown
    assert data["passed"] is True
    assert data["smoke"][-1]["after"] == "full_migration"
    suite = junit.find("testsuite")
    assert suite is not None
    cases = suite.findall("testcase")
    assert int(suite.get("tests", "0")) == len(cases)
    assert suite.get("failures") == "0"
    names = {case.get("name", "") for case in cases}
    assert "rollback after migrate_users" in names
    assert "insert public.credential (key bound varchar)" in names
    assert any(name.startswith("validate_schema names invalid_uuid") for name in names)
    assert int(suite.get("skipped", "0")) >= 1  # the compatibility notes


FIXTURES = KEYCLOAK.parent
REAL_SCHEMAS = {  # schema file: the key, and the columns referring to it
    "session_store.sql": ("public.spring_session.primary_id",
                          {"public.spring_session_attributes.session_primary_id"}),
    "workflow_engine.sql": ("public.act_ru_execution.id_", {
        f"public.{column}" for column in (
            "act_ru_execution.proc_inst_id_", "act_ru_execution.parent_id_",
            "act_ru_execution.super_exec_", "act_ru_task.execution_id_",
            "act_ru_task.proc_inst_id_", "act_ru_variable.execution_id_",
            "act_ru_variable.proc_inst_id_")}),
    "connector_store.sql": ("public.connector.id", {
        f"public.{column}" for column in (
            "connection.source_id", "connection.destination_id",
            "connector_state.connector_id", "sync_job.connector_id")}),
}


@pytest.mark.once
@pytest.mark.parametrize("schema_file", sorted(REAL_SCHEMAS))
def test_rehearsal_passes_on_real_schemas_naming_each_planted_problem_under_its_column(
        sandbox: Sandbox, schema_file: str) -> None:
    """Three applications' shapes: CHAR(36) keys, self-references and tables with two
    foreign keys to the key, a redundant unique index on it.  Every planted problem is
    named by the check and on the column it was planted in, each collision once."""
    key, children = REAL_SCHEMAS[schema_file]
    report = _rehearse_on(sandbox, str(FIXTURES / schema_file), key, users=60,
                          batch_sizes=(100,))
    assert report.problems() == []
    orphans = [p for p in report.planted if p.check == "orphans"]
    assert sorted(p.subject for p in orphans) == sorted(children)  # one in each column
    assert len({p.value for p in orphans}) == len(orphans)
    assert {p.check for p in report.planted} == {"invalid_uuid", "collision", "non_canonical",
                                                 "orphans"}
    assert all(p.found for p in report.planted)
    collisions = [f for f in report.found if f.check == "collision"]
    assert [(f.subject, f.count) for f in collisions] == [(key, 1)]
    assert [r.stage for r in report.rollbacks] == [s for s in STAGES if s != "quarantine"]


def test_a_char_keys_planted_ids_are_expected_as_its_cast_reads_them_and_remedied(
        sandbox: Sandbox, empty_db: str) -> None:
    """A CHAR(36) key pads the id planted without hyphens, and the migration's cast reads
    the padding: that id is expected among the invalid ones, as the column holds it, and
    the remedies leave only values the migration takes."""
    load_schema(str(FIXTURES / "session_store.sql"), empty_db)
    key = parse_key("public.spring_session.primary_id")
    admin = sandbox.admin_dsn_for(parse_dsn(empty_db)["dbname"])
    with connected(admin) as conn:
        plan = build_plan(conn, key=key)
        planted = populate(conn, plan, rows=20, dirty=True)
    refused = set()
    with connected(empty_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT primary_id FROM spring_session")
        for (value,) in cur.fetchall():
            cur.execute("SAVEPOINT probe")
            try:
                cur.execute("SELECT primary_id::uuid FROM spring_session WHERE primary_id = %s",
                            (value,))
            except psycopg2.errors.InvalidTextRepresentation:
                refused.add(value)
            cur.execute("ROLLBACK TO SAVEPOINT probe")
    assert refused == set(planted.invalid_ids)
    assert len(refused) == 4
    assert [v for v in planted.invalid_ids if len(v.rstrip()) == 32 and v.endswith(" ")]
    assert len(planted.non_canonical_ids) == 3

    findings = [Finding(check, Status.FAIL, check, subject=str(subject))
                for check, subject in [("invalid_uuid", key), ("collision", key),
                                       *(("orphans", child) for child in plan.children)]]
    with Session.open(empty_db, Settings(show_progress=False), key=key) as session:
        done, left = rehearse_module.apply_remedies(session, findings)
    assert left == []
    assert done[0].startswith("removed 4 row(s) of public.spring_session whose primary_id "
                              "is not a UUID")
    assert done[1].startswith("merged 1 duplicate spelling(s)")
    run_ok(empty_db, "full_migration", "--key", str(key))


@pytest.mark.once
def test_the_command_on_a_throwaway_server(tmp_path: Path) -> None:
    """The command of the CI recipe, as a user runs it: exit code 0, JSON on standard
    output, the JUnit report in the file."""
    result = CliRunner().invoke(main, [
        "--operation=rehearse", f"--schema-from={KEYCLOAK}", "--key=public.user_entity.id",
        "--users=200", "--batch-sizes=100", "--report", str(tmp_path / "r.xml"),
        "--format=json", "--log-file", str(tmp_path / "log"), "--quiet",
        "--no-live-load"])  # the report's files: no load needed (test_rehearse_load's)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["passed"] is True
    assert data["key"] == "public.user_entity.id"
    assert data["smoke"][-1]["after"] == "full_migration"
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert suite is not None
    assert suite.get("failures") == "0"


BREAKS_ON_UUID = """
CREATE TABLE accounts (uuid varchar(36) PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (
    id serial PRIMARY KEY,
    account_uuid varchar(36) NOT NULL REFERENCES accounts (uuid),
    total numeric(10, 2)
);
-- Names no column in its body: the catalog cannot see that it takes the reference as text.
CREATE FUNCTION check_reference() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE spelled text;
BEGIN
    EXECUTE format('SELECT upper(($1).%I)', TG_ARGV[0]) INTO spelled USING NEW;
    RETURN NEW;
END $$;
CREATE TRIGGER orders_reference BEFORE INSERT ON orders
    FOR EACH ROW EXECUTE FUNCTION check_reference('account_uuid');
"""


@pytest.mark.once
@pytest.mark.parametrize("broken", [True, False])
def test_a_trigger_that_breaks_on_uuid_fails_the_rehearsal_at_its_smoke_write(
        sandbox: Sandbox, tmp_path: Path, *, broken: bool) -> None:
    schema = tmp_path / "app.sql"
    body = BREAKS_ON_UUID if broken else BREAKS_ON_UUID.replace("upper(($1).%I)",
                                                                "upper(($1).%I::text)")
    schema.write_text(body)
    report = _rehearse_on(sandbox, str(schema), "public.accounts.uuid", users=50,
                          batch_sizes=(100,), dirty=False)
    failed = [p for p in report.problems() if p.startswith("smoke write")]
    assert [r.passed for r in report.rollbacks] == [True] * len(report.rollbacks)
    if not broken:
        assert report.problems() == []
        return
    assert failed, report.problems()
    assert failed[0].startswith("smoke write after full_migration: insert public.orders (key "
                                "bound unknown): function upper(uuid) does not exist")
    assert all(p.startswith("smoke write after full_migration: ") and " public.orders " in p
               for p in failed)
    assert not report.passed


def test_the_inventory_says_what_is_carried_and_what_is_refused(legacy_db: str) -> None:
    with connected(legacy_db) as conn, conn, conn.cursor() as cur:
        cur.execute("CREATE VIEW active_users AS SELECT id FROM users WHERE is_active;"
                    "CREATE MATERIALIZED VIEW user_ids AS SELECT id FROM users;"
                    "ALTER TABLE tags ENABLE ROW LEVEL SECURITY;"
                    "CREATE POLICY own_tags ON tags "
                    "USING (user_id = current_setting('app.u', true));"
                    "CREATE FUNCTION tenant_of(varchar) RETURNS text LANGUAGE sql "
                    "IMMUTABLE AS $$ SELECT 'x' $$;"
                    "CREATE POLICY tenant ON tags USING (tenant_of(user_id) = 'x');")
    with Session.open(legacy_db, Settings(show_progress=False)) as session:
        found = inventory(session.conn, session.plan, validate_schema(session))
    by_name = {" ".join(d.what.split()[:2]): d for d in found}
    assert by_name["primary key"].carried
    assert by_name["foreign key"].carried
    assert by_name["policy own_tags"].carried
    assert by_name["view public.active_users"].carried
    assert not by_name["materialized view"].carried
    assert "user_ids" in by_name["materialized view"].what
    refused = [d for d in found if "tenant" in d.what]
    assert [d.carried for d in refused] == [False]  # refused, not also listed as carried
    assert refused[0].how


def test_the_ci_recipes_command_is_one_the_command_line_takes() -> None:
    """docs/ci-recipe.md's rehearse step, its shell variables given values."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "ci-recipe.md").read_text()
    step = text.split("- name: Rehearse the UUID migration", 1)[1].split("- name:", 1)[0]
    command = step.split("run: >-", 1)[1].replace('"$APP_DATABASE_URL"',
                                                  "postgresql://app:s@localhost/app")
    words = shlex.split(command, comments=True)
    assert words[0] == "data-migration"
    context = main.make_context("data-migration", words[1:])
    assert context.params["operation"] == "rehearse"
    assert context.params["schema_from"] == "postgresql://app:s@localhost/app"
    assert context.params["key"] == "public.user_entity.id"
    assert str(context.params["report"]).endswith(".xml")


def test_production_rows_name_the_keys_table() -> None:
    key = parse_key("public.user_entity.id")
    assert parse_production_rows("5000", key) == {"user_entity": 5000}
    assert parse_production_rows("user_entity=10,credential=20", key) == {
        "user_entity": 10, "credential": 20}
    with pytest.raises(ValueError, match="give user_entity=N"):
        parse_production_rows("credential=20", key)


def test_a_schema_that_does_not_load_fails_the_rehearsal_naming_the_statement(
        sandbox: Sandbox, tmp_path: Path) -> None:
    schema = tmp_path / "app.sql"
    schema.write_text("CREATE TABLE accounts (uuid varchar(36) PRIMARY KEY);\n"
                      "CREATE TABLE orders (account_uuid varchar(36) REFERENCES acounts);\n")
    result = CliRunner().invoke(main, [
        "--operation=rehearse", f"--schema-from={schema}", "--key=accounts.uuid",
        "--database-url", sandbox.admin_dsn_for("postgres"),
        "--log-file", str(tmp_path / "log"), "--quiet", "--no-live-load"])
    assert result.exit_code == 1, result.output
    assert f"error: {schema}, line 2: CREATE TABLE orders" in result.output
    assert 'relation "acounts" does not exist' in result.output
    with connected(sandbox.admin_dsn_for("postgres")) as conn, conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE datname LIKE 'uuidmig_rehearse%'")
        assert cur.fetchall() == []  # its scratch database dropped


def test_a_schema_no_data_can_be_made_for_fails_the_rehearsal(sandbox: Sandbox,
                                                              tmp_path: Path) -> None:
    schema = tmp_path / "app.sql"
    schema.write_text("CREATE TABLE accounts (uuid varchar(36) PRIMARY KEY,\n"
                      "    n int NOT NULL CHECK (n > 5 AND n < 3));\n")
    result = CliRunner().invoke(main, [
        "--operation=rehearse", f"--schema-from={schema}", "--key=accounts.uuid",
        "--database-url", sandbox.admin_dsn_for("postgres"),
        "--log-file", str(tmp_path / "log"), "--quiet", "--no-live-load"])
    assert result.exit_code == 1, result.output
    assert ("error: rehearse could not generate data for the schema: public.accounts"
            in result.output)


def test_smoke_writes_that_cannot_be_made_fail_the_rehearsal(
        legacy_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_row(*args: Any) -> NoReturn:
        raise GenerateError("public.tags: the generated rows were refused: ...")

    monkeypatch.setattr(rehearse_module, "smoke_writes", no_row)
    with connected(legacy_db) as conn:
        plan = build_plan(conn)
    run = rehearse_module.smoke_run(legacy_db, plan, "full_migration")
    report = Report(server="", users=1, dirty=False, smoke=[run])
    assert report.problems()[1:] == ["smoke write after full_migration: generate public.users "
                                 "(key bound -): public.tags: the generated rows were "
                                 "refused: ..."]
