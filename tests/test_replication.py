"""Logical replication through the migration and the rollback: a real subscriber keeps up.

The publisher and the subscriber are two databases of one throwaway server started
with ``wal_level=logical`` (the session's server runs with the default, ``replica``),
from the session server's own binaries, so these run on each version the suite runs
on.  The subscription uses a slot made beforehand (``create_slot = false``): made by
``CREATE SUBSCRIPTION`` on the same server, it would wait on itself.  The oracle,
after each operation, with the application writing on the publisher meanwhile: the
subscription has no apply error, and the subscriber's rows equal the publisher's by
value (key columns compared as uuids), every row written on the publisher included.

The refusals need no subscriber: a publication can be created whatever ``wal_level``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import pytest
from psycopg2 import sql

from migration.rehearsal.sandbox import Sandbox, prepare
from migration.rehearsal.throwaway import Server, embedded_bin_dir, start_cluster
from migration.session import Session, Settings
from tests.operate import (
    execute,
    refusal,
    run_in_process,
    run_ok,
    run_verify,
    seeded,
    wait_until,
)
from tests.replicas import CATCH_UP_LIMIT_S, TABLES, rows, writing

_names = itertools.count(1)


@pytest.fixture(scope="module")
def logical(pg_server: Server) -> Iterator[Sandbox]:
    """A second server, of the session server's version, with ``wal_level=logical``."""
    [(bin_dir,)] = execute(pg_server.admin_dsn,
                           "SELECT setting FROM pg_config WHERE name = 'BINDIR'")
    if not (Path(str(bin_dir)) / "pg_ctl").exists():  # a server in Docker: the wheel's 18
        bin_dir = embedded_bin_dir()
    server = start_cluster(Path(str(bin_dir)), backend=pg_server.backend,
                           # a subscription per test, each keeping its apply worker
                           settings=("wal_level=logical", "max_logical_replication_workers=16",
                                     "max_worker_processes=32", "max_replication_slots=32",
                                     "max_wal_senders=32"))
    try:
        yield prepare(server.admin_dsn, prefix="uuidmig_repl")
    finally:
        server.stop()


@dataclass(frozen=True)
class Replica:
    """A publisher database (``app_pub`` on the runbook's four tables, no column list, the
    usual form) and a subscriber database holding the same tables, subscribed."""

    publisher: str = field(repr=False)  # the owner's DSN
    subscriber: str = field(repr=False)
    publisher_admin: str = field(repr=False)
    subscriber_admin: str = field(repr=False)
    subscription: str


@pytest.fixture
def replica(logical: Sandbox) -> Replica:
    name = f"repl_{next(_names)}"
    publisher = logical.create_database(f"{name}_pub")
    subscriber = logical.create_database(f"{name}_sub")
    seeded(publisher, users=40)
    execute(publisher, "CREATE PUBLICATION app_pub FOR TABLE users, journal_entries, tags, "
                       "reminders")
    found = Replica(publisher, subscriber, logical.admin_dsn_for(f"{name}_pub"),
                    logical.admin_dsn_for(f"{name}_sub"), name)
    execute(found.publisher_admin, "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')",
            (name,))
    execute(found.subscriber_admin, sql.SQL(
        "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION app_pub "
        "WITH (create_slot = false, slot_name = {})").format(
        sql.Identifier(name), sql.Literal(found.publisher_admin), sql.Literal(name)))
    assert_replicated(found)
    return found


def errors(replica: Replica) -> int:
    """The subscription's apply and table-sync errors so far."""
    [(count,)] = execute(replica.subscriber_admin,
                         "SELECT apply_error_count + sync_error_count "
                         "FROM pg_stat_subscription_stats WHERE subname = %s",
                         (replica.subscription,))
    return int(str(count))


def differences(replica: Replica) -> dict[str, tuple[int, int]]:
    """The tables whose rows differ, with the publisher's and the subscriber's row count."""
    differ = {}
    for table in TABLES:
        columns = {str(name) for (name,) in execute(
            replica.subscriber, "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name = %s", (table,))}
        published, received = (rows(replica.publisher, table, columns),
                               rows(replica.subscriber, table, columns))
        if published != received:
            differ[table] = (len(published), len(received))
    return differ


def assert_replicated(replica: Replica) -> None:
    """Wait for the subscriber to hold the publisher's rows, or for it to fail; then
    assert that it has no error and holds every row, by value."""
    wait_until(lambda: errors(replica) != 0 or not differences(replica),
               patience=CATCH_UP_LIMIT_S, pause=0.2)
    assert errors(replica) == 0, "the subscription failed to apply changes"
    assert differences(replica) == {}


def column_lists(dsn: str) -> dict[str, list[str] | None]:
    """Each table's column list in app_pub (None: every column)."""
    found = execute(dsn, "SELECT c.relname::text, CASE WHEN r.prattrs IS NULL THEN NULL ELSE "
                         "ARRAY(SELECT a.attname::text FROM unnest(r.prattrs) k(n) "
                         "JOIN pg_attribute a ON (a.attrelid, a.attnum) = (r.prrelid, k.n) "
                         "ORDER BY a.attnum) END FROM pg_publication_rel r "
                         "JOIN pg_publication p ON p.oid = r.prpubid "
                         "JOIN pg_class c ON c.oid = r.prrelid WHERE p.pubname = 'app_pub'")
    return {str(table): None if columns is None else list(columns)  # type: ignore[call-overload]
            for table, columns in found}


ORIGINAL = dict.fromkeys(TABLES)


@pytest.mark.once
def test_a_subscriber_keeps_up_through_the_migration_and_the_rollback(replica: Replica) -> None:
    with writing(replica.publisher):
        result = run_ok(replica.publisher, "full_migration")
    assert_replicated(replica)
    assert column_lists(replica.publisher) == ORIGINAL  # the original definition, back
    assert "their subscribers now receive" in " ".join(result.output.split())
    assert f"application '{replica.subscription}'" not in result.output  # a WAL sender
    assert run_verify(replica.publisher).exit_code == 0
    with writing(replica.publisher):
        run_ok(replica.publisher, "rollback")
    assert column_lists(replica.publisher) == ORIGINAL
    assert_replicated(replica)
    with writing(replica.publisher):  # and on, once the tables are strings again
        pass
    assert_replicated(replica)


@pytest.mark.once
def test_a_subscribers_own_tables_are_migrated_while_it_applies(replica: Replica) -> None:
    """The apply worker writes with session_replication_role = replica: the engine's
    triggers fire for it (ENABLE ALWAYS), so the fill's proofs pass with its rows in, the
    change log records them, and the subscription never stops."""
    preflight = " ".join(run_ok(replica.subscriber, "validate_schema", "--verbose")
                         .output.split())
    assert (f"subscription {replica.subscription} writes into public.journal_entries, "
            "public.reminders, public.tags, public.users: it may go on applying") in preflight
    with writing(replica.publisher) as writer:
        run_ok(replica.subscriber, "full_migration")
    assert writer.rounds > 0
    assert_replicated(replica)
    assert run_verify(replica.subscriber).exit_code == 0
    # the apply worker is the subscriber's only writer: these are replicated writes (and
    # verify, which finds a change made behind the log, passed)
    assert execute(replica.subscriber, "SELECT count(*) > 0 FROM migration_backup.change_log "
                                       "WHERE table_name = 'users'") == [(True,)]
    with writing(replica.publisher):
        run_ok(replica.subscriber, "rollback")
    assert_replicated(replica)
    with writing(replica.publisher):  # and on, once the tables are strings again
        pass
    assert_replicated(replica)


@pytest.mark.once
def test_an_inactive_slot_of_the_database_is_watched_and_its_lag_grows(replica: Replica) -> None:
    """A subscription disabled: its slot stays behind, and ``--max-replica-lag`` sees it
    (the role needs no privilege for pg_replication_slots), further behind at each look."""
    execute(replica.subscriber_admin, sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(
        sql.Identifier(replica.subscription)))
    slot = f"logical slot '{replica.subscription}' (inactive)"
    try:
        with Session.open(replica.publisher, Settings(max_replica_lag_s=1.0)) as session:
            lags: list[float] = []

            def growing() -> bool:
                if len(lags) >= 2 and lags[-1] > lags[0]:
                    return True
                execute(replica.publisher, "UPDATE users SET display_name = 'behind' WHERE "
                                           "email = (SELECT min(email) FROM users)")
                lags.extend(b.seconds for b in session.lag.behind(session) if b.name == slot)
                return False

            assert wait_until(growing, patience=CATCH_UP_LIMIT_S, pause=0.2), \
                f"{slot} was not seen behind: {lags}"
    finally:
        execute(replica.subscriber_admin, sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(
            sql.Identifier(replica.subscription)))
    assert_replicated(replica)


@pytest.mark.once
def test_a_rollback_before_the_swap_gives_the_publication_back(replica: Replica) -> None:
    for step in ("validate_schema", "backup_data", "migrate_users"):
        run_ok(replica.publisher, step)
    narrowed = column_lists(replica.publisher)
    assert narrowed["users"] == ["id", "email", "display_name", "is_active", "created_at"]
    assert {table: narrowed[table] for table in TABLES[1:]} == dict.fromkeys(TABLES[1:])
    with writing(replica.publisher):
        run_ok(replica.publisher, "migrate_users")  # a rerun finds it as it was left
    assert column_lists(replica.publisher) == narrowed
    assert_replicated(replica)
    with writing(replica.publisher):
        output = run_ok(replica.publisher, "rollback").output
    assert "1 publication(s) given their own definition back" in " ".join(output.split())
    assert column_lists(replica.publisher) == ORIGINAL
    assert execute(replica.publisher, "SELECT count(*) FROM migration_backup.published_columns"
                   ) == [(0,)]
    assert_replicated(replica)


@pytest.mark.once
def test_an_interrupted_fill_or_swap_leaves_the_publication_as_it_was(replica: Replica) -> None:
    """The column list changes in the transactions that add a copy and that swap: killed
    in the middle of the fill or of the swap, the run leaves it as it was, and the next
    run finds it so."""
    for step in ("validate_schema", "backup_data"):
        run_ok(replica.publisher, step)
    one_by_one = Settings(batch_size=7, jobs=1, show_progress=False)
    with pytest.raises(psycopg2.OperationalError):
        run_in_process(replica.publisher, "migrate_users", admin_dsn=replica.publisher_admin,
                       settings=one_by_one, crash_at="batch public.users.id#2")
    assert column_lists(replica.publisher)["users"] == ["id", "email", "display_name",
                                                        "is_active", "created_at"]
    run_ok(replica.publisher, "migrate_users")
    with pytest.raises(psycopg2.OperationalError):
        run_in_process(replica.publisher, "migrate_foreign_keys",
                       admin_dsn=replica.publisher_admin, settings=one_by_one, crash_at="swap#1")
    narrowed = column_lists(replica.publisher)
    assert all(narrowed[table] is not None and not any(
        column.endswith("_uuid") for column in narrowed[table] or []) for table in TABLES)
    with writing(replica.publisher):
        run_ok(replica.publisher, "migrate_foreign_keys")
    assert column_lists(replica.publisher) == ORIGINAL
    assert_replicated(replica)


def _admin(sandbox: Sandbox, dsn: str) -> str:
    return sandbox.admin_dsn_for(urlsplit(dsn).path.lstrip("/"))


def test_publications_that_take_no_column_list_are_refused_by_name(
        legacy_db: str, sandbox: Sandbox) -> None:
    seeded(legacy_db, users=20)
    execute(_admin(sandbox, legacy_db),
            "CREATE PUBLICATION everything FOR ALL TABLES; "
            "CREATE PUBLICATION by_schema FOR TABLES IN SCHEMA public; "
            "CREATE PUBLICATION not_ours FOR TABLE public.tags")  # owned by the superuser
    output = refusal(legacy_db, "full_migration")
    for name, reason in (("everything", "is FOR ALL TABLES"),
                         ("by_schema", "takes it in through TABLES IN SCHEMA"),
                         ("not_ours", "is owned by postgres")):
        assert f"publication {name} publishes public.tags and {reason}" in output
    assert ("on every subscriber of everything, first add the engine's columns to the table, "
            "as nullable columns (ALTER TABLE public.users ADD COLUMN id_uuid uuid)") in output
    assert "ALTER TABLE public.tags ADD COLUMN user_id_uuid uuid" in output
    assert "--allow-publications" in output
    accepted = run_ok(legacy_db, "full_migration", "--allow-publications").output
    assert "accepted: --allow-publications" in accepted
    output = refusal(legacy_db, "rollback")  # its string copies would be sent the same way
    assert ("publication everything publishes public.users and is FOR ALL TABLES, which takes "
            "no column list: from the first batch it would send the engine's column(s) "
            "id_text") in output
    assert "ALTER TABLE public.users ADD COLUMN id_text text" in output
    run_ok(legacy_db, "rollback", "--allow-publications")



def test_ids_not_in_canonical_form_on_a_published_table_are_warned_of(legacy_db: str) -> None:
    """A subscriber holds them as spelled; after the swap the publisher sends them in
    canonical form, and the subscriber skips the updates it cannot match (no error)."""
    seeded(legacy_db, users=20)
    execute(legacy_db, "INSERT INTO users (id, email) VALUES "
                       "(upper(gen_random_uuid()::text), 'upper@example.com'); "
                       "CREATE PUBLICATION app_pub FOR TABLE users")
    output = " ".join(run_ok(legacy_db, "validate_schema").output.split())
    assert ("[WARN] publications public.users.id: 1 id(s) of public.users.id are not in "
            "canonical form, and publication(s) app_pub publish public.users: from the swap on "
            "they are sent in canonical form") in output
    assert "publications public.tags" not in output  # not published
