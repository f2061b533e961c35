"""``bench/run.py --standby``: a streaming standby of the benchmark's server, and its lag.

``start_standby`` makes a hot standby of a server the benchmark started, from its base
backup (``pg_basebackup -R -X stream``, as ``tests/test_standby.py`` does), on another
port of this machine, and waits until it streams.  ``ReplayLag`` samples
``pg_stat_replication`` on the primary from its own superuser connection while a
method runs: the largest replay lag in bytes (``pg_current_wal_lsn() - replay_lsn``)
and in seconds (the server's ``replay_lag``), the failover window an operator would
have had.  ``caught_up`` waits, before each method, until the standby has replayed
everything, so that each method's figure is its own.  The standby shares the machine's
cores with the primary: the times of a run with ``--standby`` compare with each other,
not with a run without it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2

from bench.probe import Sampler
from migration.rehearsal.throwaway import _free_port, _make_traversable, _run_as

CATCH_UP_LIMIT_S = 900.0  # a standby that needs longer has stopped replaying: fail the run

_LAG = """
SELECT count(*), max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn))::float8,
       max(extract(epoch FROM replay_lag))::float8
FROM pg_stat_replication
"""


class StandbyError(RuntimeError):
    """The standby could not be made, or stopped replaying."""


@dataclass
class Standby:
    """A running hot standby; ``stop()`` removes it."""

    port: int
    shutdown: Callable[[], None] = field(repr=False)

    def stop(self) -> None:
        self.shutdown()


def _query(dsn: str, query: str) -> tuple[int, float | None, float | None]:
    conn = psycopg2.connect(dsn, application_name="uuid-migration-bench", connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(query)
            row = cur.fetchone()
            assert row is not None
            return int(row[0]), row[1], row[2]
    finally:
        conn.close()


def caught_up(admin_dsn: str, *, limit: float = CATCH_UP_LIMIT_S) -> None:
    """Wait until a standby streams and has replayed the primary's WAL as it is now."""
    deadline = time.monotonic() + limit
    while True:
        standbys, behind, _seconds = _query(admin_dsn, _LAG)
        if standbys and behind is not None and behind <= 0:
            return
        if time.monotonic() > deadline:
            raise StandbyError(f"the standby did not catch up within {limit:g} s "
                               f"({standbys} streaming, {behind} bytes behind)")
        time.sleep(0.2)


def start_standby(admin_dsn: str, bin_dir: Path) -> Standby:
    """A hot standby of the server of ``admin_dsn`` (a local one), streaming and caught up."""
    os_user = "nobody" if os.geteuid() == 0 else None
    workdir = Path(tempfile.mkdtemp(prefix="uuidmig-bench-standby-"))
    data, log, port = workdir / "data", workdir / "server.log", _free_port()
    as_user = _run_as(os_user)
    if os_user is not None:
        _make_traversable(workdir)
        entry = pwd.getpwnam(os_user)
        os.chown(workdir, entry.pw_uid, entry.pw_gid)

    def stop() -> None:
        if (data / "postmaster.pid").exists():
            subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                            "stop"], capture_output=True, check=False, timeout=60,
                           **as_user)  # type: ignore[call-overload]
        shutil.rmtree(workdir, ignore_errors=True)

    try:
        subprocess.run([str(bin_dir / "pg_basebackup"), "-d", admin_dsn, "-D", str(data), "-R",
                        "-X", "stream", "--checkpoint=fast", "--no-sync"],
                       capture_output=True, check=True, timeout=300, **as_user)  # type: ignore[call-overload]
        subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t",
                        "60", "-o", f"-p {port} -h 127.0.0.1 -k {workdir} -c hot_standby=on "
                        "-c fsync=off", "start"],
                       capture_output=True, check=True, timeout=90, **as_user)  # type: ignore[call-overload]
        caught_up(admin_dsn, limit=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, StandbyError) as exc:
        detail = (getattr(exc, "stderr", b"") or b"")
        text = detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)
        server_log = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        stop()
        raise StandbyError(f"no standby: {exc} {text.strip()} {server_log.strip()}") from exc
    return Standby(port, stop)


class ReplayLag(Sampler):
    """Sample the standbys' replay lag every ``interval`` seconds while a method runs."""

    name, failure, error_type = "replay-lag", "the replay lag could not be read", StandbyError

    def __init__(self, admin_dsn: str, *, interval: float = 0.1) -> None:
        super().__init__(interval)
        self.dsn = admin_dsn
        self.max_bytes = 0.0
        self.max_seconds = 0.0
        self.samples = 0
        self.standbys = 0  # the fewest standbys any sample saw streaming

    def _run(self) -> None:
        conn = psycopg2.connect(self.dsn, application_name="uuid-migration-bench",
                                connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                seen: int | None = None
                while not self._stop.is_set():
                    cur.execute(_LAG)
                    row = cur.fetchone()
                    assert row is not None
                    count, behind, seconds = int(row[0]), row[1], row[2]
                    seen = count if seen is None else min(seen, count)
                    self.max_bytes = max(self.max_bytes, float(behind or 0))
                    self.max_seconds = max(self.max_seconds, float(seconds or 0))
                    self.samples += 1
                    self._stop.wait(self.interval)
                self.standbys = seen or 0
        finally:
            conn.close()

    def as_dict(self) -> dict[str, float | int]:
        return {"max_replay_lag_bytes": self.max_bytes, "max_replay_lag_s": self.max_seconds,
                "samples": self.samples, "standbys": self.standbys}
