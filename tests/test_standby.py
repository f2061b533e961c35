"""A streaming standby through the migration and the rollback, and ``--max-replica-lag``.

A primary of its own (a throwaway server from the session server's binaries, the
default ``wal_level=replica``) and a hot standby made from its base backup
(``pg_basebackup -R``), started beside it.  The oracle: the migration and the
rollback exit 0 (``verify`` passing after the migration) while the application writes, the standby
catches up and reads what the primary reads (the key's type included); the fill
waits while the standby is further behind than the limit (its replay paused), says
so, and goes on when it catches up; a role that cannot read ``pg_stat_replication``
is warned and not held back.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
from psycopg2 import sql
from psycopg2.extensions import parse_dsn

from bench.standby import start_standby
from migration.operations import Outcome
from migration.rehearsal.report import Report, render_text
from migration.rehearsal.sandbox import OWNER_ROLE, Sandbox, prepare
from migration.rehearsal.throwaway import Server, start_cluster
from migration.rehearsal.under_load import STEPS, LagWatch, under_load
from migration.session import Settings
from tests.operate import (
    Terminal,
    execute,
    operate,
    run_in_process,
    run_ok,
    run_verify,
    seeded,
    wait_until,
)
from tests.replicas import CATCH_UP_LIMIT_S, TABLES, rows, server_bin_dir, writing

_names = iter(range(1, 1000))


def _on_port(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


@dataclass
class Cluster:
    """The primary (its sandbox) and its standby's port."""

    primary: Sandbox
    standby_port: int
    bin_dir: Path

    def standby(self, dsn: str) -> str:
        """The same database and role on the standby."""
        return _on_port(dsn, self.standby_port)


@pytest.fixture(scope="module")
def cluster(pg_server: Server) -> Iterator[Cluster]:
    bin_dir = server_bin_dir(pg_server)
    primary = start_cluster(bin_dir, backend=pg_server.backend)
    try:
        box = prepare(primary.admin_dsn, prefix="uuidmig_standby")
        standby = start_standby(primary.admin_dsn, bin_dir)
        try:
            yield Cluster(box, standby.port, bin_dir)
        finally:
            standby.stop()
    finally:
        primary.stop()


@pytest.fixture
def database(cluster: Cluster) -> str:
    """A seeded database of the legacy schema on the primary (the owner's DSN)."""
    dsn = cluster.primary.create_database(f"standby_{next(_names)}")
    seeded(dsn, users=40)
    return dsn


def caught_up(cluster: Cluster, dsn: str) -> None:
    """Wait, a bounded time, until the standby has replayed the primary's WAL as it is now."""
    [(target,)] = execute(cluster.primary.admin_dsn, "SELECT pg_current_wal_lsn()")
    standby = cluster.standby(cluster.primary.admin_dsn)
    assert wait_until(lambda: execute(standby, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
                                      (target,)) == [(True,)],
                      patience=CATCH_UP_LIMIT_S, pause=0.2), \
        f"the standby did not replay up to {target}"


def key_types(dsn: str) -> set[str]:
    return {str(t) for (t,) in execute(
        dsn, "SELECT data_type FROM information_schema.columns WHERE table_schema = 'public' "
             "AND (table_name, column_name) IN (('users', 'id'), ('journal_entries', "
             "'user_id'), ('tags', 'user_id'), ('reminders', 'user_id'))")}


def assert_standby_reads_the_primary(cluster: Cluster, dsn: str, key_type: str) -> None:
    caught_up(cluster, dsn)
    standby = cluster.standby(dsn)
    assert key_types(dsn) == key_types(standby) == {key_type}
    for table in TABLES:
        columns = {str(c) for (c,) in execute(
            dsn, "SELECT column_name FROM information_schema.columns WHERE table_schema = "
                 "'public' AND table_name = %s", (table,))}
        assert rows(standby, table, columns) == rows(dsn, table, columns), table


@pytest.mark.once
def test_a_standby_replays_the_migration_and_the_rollback(cluster: Cluster,
                                                          database: str) -> None:
    with writing(database):
        run_ok(database, "full_migration")
    assert run_verify(database).exit_code == 0
    assert_standby_reads_the_primary(cluster, database, "uuid")
    with writing(database):
        run_ok(database, "rollback")
    assert_standby_reads_the_primary(cluster, database, "character varying")


@dataclass
class Running:
    """An operation run through the engine's API in a thread, the fault points it passed."""

    reached: list[str] = field(default_factory=list)
    outcome: list[Outcome] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)


def run_in_thread(dsn: str, operation: str, settings: Settings) -> tuple[Running,
                                                                          threading.Thread]:
    running = Running()

    def work() -> None:
        try:
            running.outcome.append(run_in_process(dsn, operation, settings=settings,
                                                  reached=running.reached))
        except BaseException as exc:
            running.failures.append(exc)

    thread = threading.Thread(target=work, name=operation)
    thread.start()
    return running, thread


def standby_lag(cluster: Cluster) -> float:
    """The server's own ``replay_lag`` of the standby, in seconds (0 when NULL)."""
    [(lag,)] = execute(cluster.primary.admin_dsn, "SELECT coalesce(extract(epoch FROM "
                       "max(replay_lag)), 0)::float8 FROM pg_stat_replication")
    return float(str(lag))


@contextmanager
def backed_up_while_the_standby_lags(cluster: Cluster, dsn: str) -> Iterator[None]:
    """The backup taken, the owner granted ``pg_monitor`` (to read the lag) for the
    with-block, and the standby made more than a second behind."""
    for step in ("validate_schema", "backup_data"):
        run_ok(dsn, step)
    with the_standby_lagging(cluster, dsn):
        yield


@contextmanager
def the_standby_lagging(cluster: Cluster, dsn: str) -> Iterator[None]:
    """The owner granted ``pg_monitor`` (to read the lag) for the with-block, and the
    standby made more than a second behind."""
    role = sql.Identifier(OWNER_ROLE)
    cluster.primary.admin_execute(sql.SQL("GRANT pg_monitor TO {}").format(role))
    try:
        make_the_standby_lag(cluster, dsn, 1.0)
        yield
    finally:
        cluster.primary.admin_execute(sql.SQL("REVOKE pg_monitor FROM {}").format(role))


def make_the_standby_lag(cluster: Cluster, dsn: str, seconds: float) -> None:
    """Pause the standby's replay, and write on the primary until the standby is more than
    ``seconds`` behind (a bounded wait: each write has the standby report its position)."""
    execute(cluster.standby(cluster.primary.admin_dsn), "SELECT pg_wal_replay_pause()")

    def behind() -> bool:
        if standby_lag(cluster) > seconds:
            return True
        execute(dsn, "UPDATE users SET display_name = display_name WHERE email = "
                     "(SELECT min(email) FROM users)")
        return False

    assert wait_until(behind, patience=CATCH_UP_LIMIT_S, pause=0.2), \
        "the standby never fell behind"


def resume_the_standby(cluster: Cluster) -> None:
    execute(cluster.standby(cluster.primary.admin_dsn), "SELECT pg_wal_replay_resume()")


def wait_for(running: Running, point: str, thread: threading.Thread) -> None:
    assert wait_until(lambda: point in running.reached or not thread.is_alive(),
                      patience=CATCH_UP_LIMIT_S, pause=0.1), f"{point} was never reached"


@pytest.mark.once
def test_the_fill_waits_while_the_standby_is_behind_and_goes_on_when_it_catches_up(
        cluster: Cluster, database: str, caplog: pytest.LogCaptureFixture) -> None:
    with backed_up_while_the_standby_lags(cluster, database):
        caplog.set_level(logging.INFO, logger="migration")
        running, thread = run_in_thread(database, "migrate_users", Settings(
            batch_size=7, jobs=1, show_progress=False, max_replica_lag_s=1.0))
        try:
            wait_for(running, "standbys behind#1", thread)
            assert running.failures == []
            assert thread.is_alive(), "the fill did not wait"
            [(filled,)] = execute(database, "SELECT count(*) FILTER (WHERE finished) FROM "
                                            "migration_backup.backfill_progress")
            assert filled == 0  # it waits in the fill, before its first batch
        finally:
            resume_the_standby(cluster)
            thread.join()
    assert running.failures == []
    assert len(running.outcome) == 1  # it finished
    text = caplog.text
    assert "standby 'walreceiver'" in text
    assert "s behind (more than --max-replica-lag=1 s): pausing until it catches up" in text
    assert "the standbys caught up: resuming after a pause of" in text
    run_ok(database, "migrate_foreign_keys")
    assert run_verify(database).exit_code == 0
    assert_standby_reads_the_primary(cluster, database, "uuid")


@pytest.mark.once
def test_the_backup_copy_waits_while_the_standby_is_behind_and_goes_on_when_it_catches_up(
        cluster: Cluster, database: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The backup's copy, one snapshot, waits between its batches of pages (its transaction
    open, the lag read on a connection of its own) and shows the pause on its progress
    line; once the standby catches up it goes on, and the backup is whole."""
    run_ok(database, "validate_schema")
    terminal = Terminal()
    monkeypatch.setattr("migration.progress.sys.stderr", terminal)
    with the_standby_lagging(cluster, database):
        caplog.set_level(logging.INFO, logger="migration")
        running, thread = run_in_thread(database, "backup_data", Settings(
            batch_size=7, show_progress=True, max_replica_lag_s=1.0))
        try:
            wait_for(running, "standbys behind#1", thread)
            assert running.failures == []
            assert thread.is_alive(), "the copy did not wait"
            assert running.reached[-2:] == ["backup_data: batch public.users#1",
                                            "standbys behind#1"]  # after its first batch
            # nothing of the copy committed yet: it waits inside its one transaction
            assert execute(database, "SELECT to_regclass('migration_backup.backup_tables')"
                           ) == [(None,)]
        finally:
            resume_the_standby(cluster)
            thread.join()
    assert running.failures == []
    assert running.outcome[0].rows == sum(
        n for (n,) in execute(database, "SELECT count(*) FROM users UNION ALL SELECT count(*) "
                                        "FROM journal_entries UNION ALL SELECT count(*) FROM "
                                        "tags UNION ALL SELECT count(*) FROM reminders"))
    assert "s behind (more than --max-replica-lag=1 s): pausing until it catches up" \
        in caplog.text
    assert "the standbys caught up: resuming after a pause of" in caplog.text
    assert re.search(r"\rbackup_data: [1-9][\d,]* rows, ", terminal.getvalue())
    assert ", paused, standby 'walreceiver'" in terminal.getvalue()
    run_ok(database, "full_migration")
    assert run_verify(database).exit_code == 0


@pytest.mark.once
def test_a_role_that_cannot_read_the_lag_is_warned_and_not_held_back(
        cluster: Cluster, database: str, caplog: pytest.LogCaptureFixture) -> None:
    for step in ("validate_schema", "backup_data"):
        run_ok(database, step)
    make_the_standby_lag(cluster, database, 1.0)
    try:
        caplog.set_level(logging.INFO, logger="migration")
        run_in_process(database, "migrate_users", settings=Settings(
            batch_size=7, jobs=2, show_progress=False, max_replica_lag_s=1.0))
    finally:
        resume_the_standby(cluster)
    assert ("this role cannot read the lag of 1 standby(s) in pg_stat_replication (it needs "
            "pg_monitor or pg_read_all_stats)") in caplog.text
    assert "pausing" not in caplog.text
    caught_up(cluster, database)



@pytest.mark.once
def test_a_failed_fill_worker_stops_the_others_waiting_for_the_standby(
        cluster: Cluster, database: str) -> None:
    """Two fill connections, the standby behind: the one that looks is killed while it
    waits; the other, waiting for the standby too, stops with it (the run fails and can
    be resumed) instead of waiting for a standby that is not catching up."""
    with backed_up_while_the_standby_lags(cluster, database):
        failures: list[BaseException] = []

        def work() -> None:
            try:
                run_in_process(database, "migrate_users", admin_dsn=cluster.primary.admin_dsn,
                               crash_at="standbys behind#1", settings=Settings(
                                   batch_size=7, jobs=2, show_progress=False,
                                   max_replica_lag_s=1.0))
            except BaseException as exc:
                failures.append(exc)

        thread = threading.Thread(target=work, name="migrate_users")
        thread.start()
        try:
            thread.join(CATCH_UP_LIMIT_S)  # a bounded wait, the standby still paused
            assert not thread.is_alive(), "a fill worker kept waiting for the standby"
        finally:
            resume_the_standby(cluster)
            thread.join()
    assert [type(exc) for exc in failures] == [psycopg2.OperationalError]
    run_ok(database, "migrate_users")  # it resumes
    run_ok(database, "migrate_foreign_keys")
    assert run_verify(database).exit_code == 0


@pytest.mark.once
def test_the_live_load_report_gives_the_standbys_longest_lag_in_each_phase(
        cluster: Cluster, database: str) -> None:
    """``rehearse --live-load`` reads the replication lag of its server on a connection of its
    own (``lag.py``'s reader), as its administrator: the standby, its replay paused, is named
    with the longest lag seen in each step's phase; the owner, who cannot read
    ``pg_stat_replication``, gets a note instead, and the load is not held back for it."""
    def step(name: str) -> str | None:
        result = operate(database, name)
        return None if result.exit_code == 0 else result.output

    dbname = str(parse_dsn(database)["dbname"])
    execute(cluster.standby(cluster.primary.admin_dsn), "SELECT pg_wal_replay_pause()")
    try:
        load = under_load(database, step, baseline_s=0.2,
                          lag_dsn=cluster.primary.admin_dsn_for(dbname))
    finally:
        resume_the_standby(cluster)
    assert load.failed() == []
    assert load.replica_lag is not None
    for phase in STEPS:
        worst = load.replica_lag.longest[phase]
        assert worst.name.startswith("standby 'walreceiver'"), worst
        assert worst.seconds > 0, worst  # seen behind (replay paused), not a speed bound
    text = render_text(Report(server="test", users=40, dirty=False, live_load=load))
    assert re.search(r"longest replication lag in full_migration: standby 'walreceiver' "
                     r"\(pid \d+[^)]*\) is [\d.]+ s behind", text), text
    assert "no standby or logical slot" not in text

    with LagWatch(database) as hidden:  # the owner: not a member of pg_monitor
        hidden.phase("full_migration")
    assert hidden.report().lines() == [
        "replication lag: this role cannot read the lag of 1 standby(s) in "
        "pg_stat_replication (it needs pg_monitor or pg_read_all_stats)"]
    caught_up(cluster, database)
