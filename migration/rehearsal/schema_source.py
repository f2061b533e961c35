"""``rehearse --schema-from=DSN|FILE.sql``: the application's own schema in a scratch database.

From a DSN, ``pg_dump --schema-only --no-owner --no-privileges`` of that
database (the pg_dump of the lowest major version not older than the server:
a newer pg_dump writes settings an older scratch server may not know); the
password travels in the environment (``PGPASSWORD``), never on the command
line or in any message.  From a file, its SQL as the application's
migrations (or a dump) wrote it.

Applying it, statement by statement so that an error names the statement:

- the psql meta-commands pg_dump writes (``\\connect``, ``\\restrict``,
  ``\\unrestrict``) are left out; any other meta-command is refused;
- ownership and privileges are left out, as ``--no-owner --no-privileges``
  does for a DSN: ``ALTER ... OWNER TO``, ``GRANT``, ``REVOKE`` and
  ``ALTER DEFAULT PRIVILEGES`` name roles the throwaway server does not
  have, and everything loaded belongs to the role the migration runs as,
  the tables' owner, as in production.  No role is created: roles are
  server-wide and would outlive the scratch databases.  Any other statement
  naming a missing role (``CREATE POLICY ... TO app_reader``) fails, named;
- a ``SET`` of a parameter the scratch server does not know (a dump's
  header from a newer server) is left out.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
from psycopg2.extensions import parse_dsn

from migration.connection import Connection, connected, describe_dsn, redact_dsn
from migration.errors import MigrationError
from migration.rehearsal import throwaway
from migration.rehearsal.load import libpq_env

APPLICATION_NAME = "uuidmig-schema-from"
PG_DUMP_OPTIONS = ("--schema-only", "--no-owner", "--no-privileges", "--no-subscriptions",
                   "--no-tablespaces", "--no-security-labels")
SKIPPED_META = ("connect", "c", "restrict", "unrestrict")
_PRIVILEGES = re.compile(
    r"^\s*(GRANT|REVOKE|ALTER\s+DEFAULT\s+PRIVILEGES)\b|\bOWNER\s+TO\s+\S+\s*$",
    re.IGNORECASE | re.DOTALL)
_SET = re.compile(r"^\s*SET\s+(?:SESSION\s+)?([a-z_][a-z0-9_.]*)\s*(?:=|TO\b)",
                  re.IGNORECASE)


class SchemaSourceError(MigrationError):
    """The schema could not be read or applied; the message names the statement."""


@dataclass(frozen=True)
class Statement:
    text: str
    line: int
    """Line of the source where the statement starts (1-based)."""

    def head(self, width: int = 160) -> str:
        flat = " ".join(self.text.split())
        return flat if len(flat) <= width else flat[:width - 3] + "..."


@dataclass
class Loaded:
    """What applying a schema did: statements run, and those left out (with why)."""

    origin: str
    applied: int = 0
    skipped: list[str] = field(default_factory=list)


def is_dsn(source: str) -> bool:
    """A PostgreSQL URI or a ``key=value`` connection string, not a file name."""
    return source.startswith(("postgres://", "postgresql://")) or bool(
        re.match(r"^\s*\w+\s*=", source))


# --- reading -------------------------------------------------------------------------------------

def read_schema(source: str) -> tuple[str, str]:
    """(SQL text, where it came from, password-free) of a DSN or a file."""
    if is_dsn(source):
        return dump_schema(source), f"pg_dump of {describe_dsn(source)}"
    path = Path(source)
    if not path.is_file():
        raise SchemaSourceError(f"--schema-from: no such file {source!r}",
                                hint="give a SQL file or a postgresql:// URL")
    return path.read_text(encoding="utf-8"), str(path)


def _major(version: str) -> int:
    """``"15.4"``, ``"pg_dump (PostgreSQL) 18.1"``, ``"150004"`` -> the major version."""
    digits = re.search(r"(\d+)(?:\.(\d+))?", version)
    if digits is None:
        raise ValueError(f"no version in {version!r}")
    number = int(digits.group(1))
    return number // 10000 if number >= 10000 else number


def pg_dump_candidates() -> list[Path]:
    """Every pg_dump at hand: the embedded wheel's, pgserver's, the system's."""
    folders: list[Path | None] = []
    for find in (throwaway.embedded_bin_dir, throwaway.pgserver_bin_dir):
        try:
            folders.append(find())
        except throwaway.ServerUnavailable:
            continue
    folders.append(throwaway.local_bin_dir())
    on_path = shutil.which("pg_dump")
    found = [f / "pg_dump" for f in folders if f is not None and (f / "pg_dump").is_file()]
    return found + ([Path(on_path)] if on_path else [])


def pg_dump_version(binary: Path) -> int:
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                          timeout=30, check=True)
    return _major(done.stdout)


def choose_pg_dump(server_major: int, candidates: list[Path]) -> Path:
    """The pg_dump of the lowest major version not older than the server's."""
    versions: dict[Path, int] = {}
    for binary in candidates:
        try:
            versions[binary] = pg_dump_version(binary)
        except (OSError, subprocess.SubprocessError, ValueError):
            continue
    usable = [b for b, v in versions.items() if v >= server_major]
    if not usable:
        seen = ", ".join(f"{b} ({v})" for b, v in versions.items()) or "none"
        raise SchemaSourceError(
            f"--schema-from: no pg_dump of PostgreSQL {server_major} or newer (found: {seen})",
            hint="install the PostgreSQL client of that version, or dump the schema yourself "
                 "and pass the file")
    return min(usable, key=lambda b: versions[b])


def dump_schema(dsn: str) -> str:
    """``pg_dump --schema-only`` of ``dsn``; the password only in the child's environment."""
    where = describe_dsn(dsn)
    try:
        with connected(dsn) as conn, conn.cursor() as cur:
            cur.execute("SHOW server_version_num")
            row = cur.fetchone()
    except Exception as exc:
        raise SchemaSourceError(f"--schema-from: cannot connect to {where}: "
                                f"{redact_dsn(str(exc)).strip()}") from None
    binary = choose_pg_dump(_major(str(row[0] if row else "")), pg_dump_candidates())
    env = libpq_env(dsn)
    env["PGAPPNAME"] = APPLICATION_NAME
    options = parse_dsn(dsn).get("options")
    if options:
        env["PGOPTIONS"] = options
    done = subprocess.run([str(binary), *PG_DUMP_OPTIONS], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise SchemaSourceError(f"--schema-from: pg_dump of {where} failed: "
                                f"{redact_dsn(done.stderr).strip()}")
    return done.stdout


# --- splitting -----------------------------------------------------------------------------------

_DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def split_statements(text: str, origin: str = "schema") -> tuple[list[Statement], list[str]]:
    """The SQL statements of ``text`` and the psql meta-commands left out.

    Quotes, dollar quotes, quoted identifiers and comments are respected; a
    backslash at the start of a line outside them is a psql meta-command,
    which ends at the end of its line.  Meta-commands other than those
    pg_dump writes are refused, naming the line.
    """
    statements: list[Statement] = []
    skipped: list[str] = []
    start, i, n = 0, 0, len(text)
    while i < n:
        ch = text[i]
        if text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            i = _block_comment_end(text, i)
        elif ch in "'\"":
            i = _quote_end(text, i, ch)
        elif ch == "$" and (m := _DOLLAR.match(text, i)) and not _in_word(text, i):
            close = text.find(m.group(0), m.end())
            i = n if close < 0 else close + len(m.group(0))
        elif ch == "\\" and _line_start(text, i) and not _has_code(text[start:i]):
            end = text.find("\n", i)
            i = n if end < 0 else end
            skipped.append(_meta_command(text[text.rfind("\n", 0, i) + 1:i].strip(),
                                         text.count("\n", 0, i) + 1, origin))
            start = i
        elif ch == ";":
            i += 1
            statements.append(Statement(text[start:i].strip(), 0))
            start = i
        else:
            i += 1
    statements.append(Statement(text[start:].strip(), 0))
    kept = [s for s in statements if _has_code(s.text)]
    return _with_start_lines(text, kept), skipped


def _meta_command(command: str, line: int, origin: str) -> str:
    """What a skipped meta-command reads as in the report; other meta-commands are refused."""
    name = command[1:].split(maxsplit=1)[0] if len(command) > 1 else ""
    if name not in SKIPPED_META:
        raise SchemaSourceError(
            f"{origin}, line {line}: psql meta-command {command.split()[0]} is not "
            f"supported (only {', '.join(chr(92) + m for m in SKIPPED_META)}, which "
            "pg_dump writes, are left out)",
            hint="give plain SQL, as pg_dump --schema-only writes it")
    return f"line {line}: psql meta-command \\{name}"


def _noise_end(body: str, i: int = 0) -> int:
    """Past the whitespace and comments at ``body[i:]``."""
    while i < len(body):
        if body[i] in " \t\r\n;":
            i += 1
        elif body.startswith("--", i):
            end = body.find("\n", i)
            i = len(body) if end < 0 else end
        elif body.startswith("/*", i):
            i = _block_comment_end(body, i)
        else:
            break
    return i


def _has_code(body: str) -> bool:
    """Whether ``body`` holds more than comments and semicolons."""
    return _noise_end(body) < len(body)


def _with_start_lines(text: str, statements: list[Statement]) -> list[Statement]:
    """Each statement's line: where its first code (after comments) starts."""
    out, position = [], 0
    for statement in statements:
        found = text.find(statement.text, position)
        position = found + len(statement.text) if found >= 0 else position
        body = statement.text
        skip = _noise_end(body)
        out.append(Statement(body[skip:], text.count("\n", 0, found + skip) + 1 if found >= 0
                             else statement.line))
    return out


def _line_start(text: str, i: int) -> bool:
    return i == 0 or text[text.rfind("\n", 0, i) + 1:i].strip() == ""


def _in_word(text: str, i: int) -> bool:
    """``a$1$`` is an identifier with dollars in it, not a dollar quote."""
    return i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_$")


def _block_comment_end(text: str, i: int) -> int:
    depth, i = 1, i + 2
    while i < len(text) and depth:
        if text.startswith("/*", i):
            depth, i = depth + 1, i + 2
        elif text.startswith("*/", i):
            depth, i = depth - 1, i + 2
        else:
            i += 1
    return i


def _quote_end(text: str, i: int, quote: str) -> int:
    """Past the closing quote; ``''`` is an escaped quote, ``E'\\''`` a backslash escape."""
    escapes = quote == "'" and i > 0 and text[i - 1] in "eE" and not _in_word(text, i - 1)
    i += 1
    while i < len(text):
        if escapes and text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            if text.startswith(quote * 2, i):
                i += 2
                continue
            return i + 1
        i += 1
    return i


# --- applying ------------------------------------------------------------------------------------

def left_out(statement: Statement, conn: Connection) -> str | None:
    """Why ``statement`` is not applied, or None to apply it."""
    if _PRIVILEGES.search(statement.text):
        return "ownership or privilege (loaded as the tables' owner)"
    setting = _SET.match(statement.text)
    if setting:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_catalog.pg_settings WHERE name = %s",
                        (setting.group(1).lower(),))
            row = cur.fetchone()
        if not (row and row[0]) and "." not in setting.group(1):
            return f"parameter {setting.group(1)} unknown to this server"
    return None


def apply_schema(dsn: str, text: str, origin: str) -> Loaded:
    """Run the statements of ``text`` on ``dsn``, each on its own (as psql does).

    An error names the source, the statement's line and its text, and the
    server's message; the scratch database is then thrown away by the caller.
    """
    statements, meta = split_statements(text, origin)
    loaded = Loaded(origin, skipped=list(meta))
    with connected(dsn, autocommit=True) as conn:
        for statement in statements:
            why = left_out(statement, conn)
            if why:
                loaded.skipped.append(f"line {statement.line}: {statement.head(80)} ({why})")
                continue
            try:
                with conn.cursor() as cur:
                    cur.execute(statement.text)
            except psycopg2.Error as exc:
                raise SchemaSourceError(
                    f"{origin}, line {statement.line}: {statement.head()}: "
                    f"{redact_dsn(str(exc)).strip().splitlines()[0]}",
                    hint="fix the statement in the schema, or create what it needs on the "
                         "rehearsal's server first") from None
            loaded.applied += 1
    return loaded


def load_schema(source: str, dsn: str) -> Loaded:
    """The schema of ``source`` (a DSN or a SQL file) applied to the database of ``dsn``."""
    text, origin = read_schema(source)
    return apply_schema(dsn, text, origin)
