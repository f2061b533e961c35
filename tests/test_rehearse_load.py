"""``rehearse --live-load``: the migration and the rollback under pgbench, as the report says.

The load itself (pgbench, the ledger, the prober) is proven in test_live_load.py; here
its wiring: each step its own phase, what the application saw reaching the report,
and a problem under load failing the rehearsal.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from psycopg2 import sql

from migration.cli import main
from migration.plan import Plan, build_plan, parse_key
from migration.rehearsal import rehearse as rehearse_module
from migration.rehearsal import under_load as under_load_module
from migration.rehearsal.generate import populate
from migration.rehearsal.load import LoadUnavailable, PhaseStats
from migration.rehearsal.rehearse import RehearsalOptions, live_load_wanted, rehearse
from migration.rehearsal.report import Report, render_junit, render_text
from migration.rehearsal.sandbox import Sandbox
from migration.rehearsal.schema_load import SchemaLoad
from migration.rehearsal.under_load import STEPS, LoadRun, under_load
from tests.operate import connected, execute, operate, seeded, wait_until

# The rehearsal under load: a tool around the engine, tested on one server.
pytestmark = pytest.mark.once


def under_load_problems(report: Report) -> list[str]:
    """The report's problems from the load (a report made here has no final migration)."""
    return [p for p in report.problems() if p.startswith("under live load")]


def test_the_migration_and_the_rollback_run_under_load_each_a_phase(legacy_db: str) -> None:
    seeded(legacy_db, users=500)
    ran: list[str] = []

    def step(name: str) -> str | None:
        ran.append(name)
        result = operate(legacy_db, name, "--batch-size=100")
        return None if result.exit_code == 0 else result.output

    load = under_load(legacy_db, step, baseline_s=1.0)
    assert ran == list(STEPS)
    assert load.failed() == []
    assert [p.name for p in load.phases] == ["before", *STEPS, "after"]
    assert load.transactions > 0
    assert execute(legacy_db, "SELECT data_type FROM information_schema.columns WHERE "
                              "(table_name, column_name) = ('users', 'id')") == [
        ("character varying",)]  # rolled back, with the load's rows kept
    report = Report(server="test", users=500, dirty=False, live_load=load)
    assert under_load_problems(report) == []
    text = render_text(report)
    assert "Under live load (4 pgbench clients at 150 transactions/s" in text
    assert "no application transaction failed" in text
    assert "replication lag: no standby or logical slot on the rehearsal server" in text


def test_a_step_that_fails_under_load_ends_the_run_and_is_named(legacy_db: str) -> None:
    seeded(legacy_db, users=50)
    load = under_load(legacy_db, lambda name: "refused: something", baseline_s=0.2)
    assert load.error == "full_migration: refused: something"
    assert [p.name for p in load.phases] == ["before", "full_migration", "after"]


def test_what_the_application_saw_go_wrong_fails_the_rehearsal() -> None:
    phase = PhaseStats("full_migration", 2.0, 300, 1, 1.0, 5.0, 40.0, 0.04, 0.5,
                       "migrate_foreign_keys", 0.03,
                       due_stall_waits=(("Lock relation", 3), ("CPU", 1)))
    load = LoadRun(150.0, 4, [phase], 300, problems=[
        "1 of 301 application transactions failed: 1x new_tag: failed (42P01)"])
    report = Report(server="test", users=1, dirty=False, live_load=load)
    assert under_load_problems(report) == [
        "under live load: 1 of 301 application transactions failed: 1x new_tag: failed (42P01)"]
    assert not report.passed
    assert "new_tag: failed (42P01)" in render_text(report)
    assert "0.04 s at 0.50 s (migrate_foreign_keys)" in render_text(report)  # the stall's step
    assert "Lock relation 75%, CPU 25%" in render_text(report)  # and what it waited on
    assert "new_tag: failed (42P01)" in render_junit(report)


def test_the_command_runs_the_load_with_schema_from_unless_told_not_to(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``rehearse --schema-from`` without ``--live-load``: the load is on (pgbench is found
    here), ``--no-live-load`` turns it off.  The rehearsal itself is not run: the options
    the command gives it are what is looked at."""
    given: list[RehearsalOptions] = []

    def rehearsal(database_url: str | None, options: RehearsalOptions, say: object) -> Report:
        given.append(options)
        return Report(server="not run", users=options.users, dirty=options.dirty)

    monkeypatch.setattr(rehearse_module, "rehearse", rehearsal)
    schema = tmp_path / "own.sql"
    schema.write_text(OWN_SCHEMA)
    for flags in ([], ["--no-live-load"]):
        CliRunner().invoke(main, ["--operation=rehearse", f"--schema-from={schema}",
                                  f"--key={OWN_KEY}", "--log-file", str(tmp_path / "log"),
                                  "--quiet", *flags])
    assert [options.live_load for options in given] == [True, False]
    assert given[0].schema_from == str(schema)


def test_live_load_is_a_usage_error_with_other_operations() -> None:
    result = operate("postgresql://nobody@127.0.0.1:1/none", "full_migration", "--live-load")
    assert result.exit_code == 2
    assert "--live-load belongs to --operation=rehearse" in result.output
    result = operate("postgresql://nobody@127.0.0.1:1/none", "full_migration", "--no-live-load")
    assert result.exit_code == 2
    assert "--live-load belongs to --operation=rehearse" in result.output


def test_live_load_is_on_by_default_where_pgbench_is_found(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not given: on where pgbench 15 or later is found (the suite's hosts have one), with
    --schema-from too; given, as given."""
    assert live_load_wanted(given=None) is True
    assert live_load_wanted(given=False) is False
    assert live_load_wanted(given=True) is True

    def missing() -> None:
        raise LoadUnavailable("no pgbench 15 or later among nothing")

    monkeypatch.setattr(under_load_module, "find_pgbench", missing)
    assert live_load_wanted(given=None) is False
    assert live_load_wanted(given=True) is True  # asked for: its absence reported


# --- --schema-from: the load made for the operator's schema (schema_load) --------------------

# A key of another name, a child whose foreign key cascades on delete only (its rows are
# left out of the families whose key changes), one that cascades on update only (deleted
# before its parent), a CHECK, unique columns, a serial identity and a row with none; a
# column named as the load's pools number their rows (n).
OWN_SCHEMA = """
CREATE TABLE accounts (
    uuid varchar(36) PRIMARY KEY,
    email text NOT NULL UNIQUE,
    tier text NOT NULL CHECK (tier IN ('free', 'pro')),
    credits integer NOT NULL DEFAULT 0 CHECK (credits >= 0));
CREATE TABLE sessions (
    id bigserial PRIMARY KEY,
    account_uuid varchar(36) NOT NULL REFERENCES accounts (uuid) ON DELETE CASCADE,
    token text NOT NULL UNIQUE,
    seen_at timestamptz,
    n integer);
CREATE TABLE invoices (
    account_uuid varchar(36) NOT NULL REFERENCES accounts (uuid) ON UPDATE CASCADE,
    amount numeric(10, 2) NOT NULL CHECK (amount > 0),
    note text);
"""
OWN_KEY = "accounts.uuid"


@pytest.fixture
def own_schema(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[tuple[str, Plan]]:
    """A database of ``OWN_SCHEMA`` filled by the generator, and its plan."""
    with sandbox.database(f"own_{request.node.name[:40].lower()}", variant=None) as dsn:
        execute(dsn, OWN_SCHEMA)
        with connected(dsn) as conn:
            plan = build_plan(conn, key=parse_key(OWN_KEY))
            populate(conn, plan, rows=200, dirty=False)
        yield dsn, plan


def test_the_load_of_an_own_schema_writes_every_table_and_loses_nothing(
        own_schema: tuple[str, Plan]) -> None:
    dsn, plan = own_schema

    def step(name: str) -> str | None:
        result = operate(dsn, name, f"--key={OWN_KEY}", "--batch-size=50")
        return None if result.exit_code == 0 else result.output

    with SchemaLoad(dsn, plan, rate=60, clients=2, prepared_clients=1, pool_rows=2000) as load:
        # Before the migration, a key update or a delete of the load's families committed
        # (not asserted here: the ledger's counts below say what was written where).
        wait_until(lambda: _families_changed(dsn), pause=0.2)
        for name in STEPS:
            load.phase(name)
            assert step(name) is None
        load.phase("after")  # the load's deletes and key updates work after the rollback
        mark = execute(dsn, "SELECT max(seq) FROM live_load.ledger")[0][0]
        # and a key update cascaded to invoices at some point (the load picks its families
        # at random: waited for, not hoped for)
        assert wait_until(lambda: _families_changed(dsn, mark)
                          and execute(dsn, _REKEYED_INVOICES)[0][0] > 0, pause=0.2)
        report = load.stop()
    assert report.problems() == [], "\n".join([*report.problems(), report.describe()])
    assert report.missing_writes == []
    written = {kind.removesuffix(" write") for kind, n in report.ledger_rows.items()
               if kind.endswith(" write") and n}
    assert written == {str(table) for table in plan.tables}, report.ledger_rows
    assert {"public.accounts gone", "public.sessions gone",
            "public.invoices gone"} <= set(report.ledger_rows), report.ledger_rows
    assert execute(dsn, "SELECT data_type FROM information_schema.columns WHERE "
                        "(table_name, column_name) = ('accounts', 'uuid')") == [
        ("character varying",)]
    # The prepared client's statements broke at the swap, each named with its SQLSTATE.
    assert report.notes(), report.prepared_failures
    assert all("SQLSTATE 42804" in n or "SQLSTATE 42883" in n for n in report.notes())
    assert report.probes > 0
    assert report.fk_unenforced_s == 0
    assert {table for table, _, _ in load.prober.probes} == {"public.sessions",
                                                              "public.invoices"}
    assert load.skipped == ["updates of public.invoices: its rows have no identity (no primary "
                            "key or unique key over NOT NULL columns)"]


def test_each_tables_pool_holds_its_share_of_the_loads_transactions(
        own_schema: tuple[str, Plan]) -> None:
    """Each table's generated rows are its share of the transactions the load is sized for,
    by the weights of the scripts that take them (so a schema of many tables does not
    generate every table's rows for every transaction), each taken by a counter of its own.
    Here, of 14: accounts 6 (new families 3, rekeyable ones 1, updates 2), sessions 7
    (families 3, updates 2, inserts 2), invoices 6 (families 3 and 1, inserts 2)."""
    dsn, plan = own_schema
    with SchemaLoad(dsn, plan, rate=10, clients=1, pool_rows=1000) as load:
        weights = {name: weight for name, (weight, _) in load.scripts.items()}
        assert sum(weights.values()) == 14, weights
        assert {str(part.table): load.pool_sizes[part.number] for part in load.parts} == {
            "public.accounts": 429, "public.sessions": 500, "public.invoices": 429}
        assert {part.number: execute(dsn, sql.SQL("SELECT max(n) FROM {}").format(
            part.pool))[0][0] for part in load.parts} == load.pool_sizes
        load.stop()


def test_the_ledger_of_an_own_schema_sees_the_writes_undone_behind_its_back(
        own_schema: tuple[str, Plan]) -> None:
    dsn, plan = own_schema
    with SchemaLoad(dsn, plan, rate=60, clients=2, pool_rows=500) as load:
        # an invoice inserted too: at times none was when the families had changed
        wait_until(lambda: _families_changed(dsn) and bool(execute(dsn, _AN_INSERTED_INVOICE)),
                   pause=0.2)
        with connected(dsn, autocommit=False) as conn, conn.cursor() as cur:
            # the oldest family locked first: the load's key updates and deletes skip a
            # locked family, and one under way is waited for (its key read after it)
            while cur.execute(_OLDEST_FAMILY) or not cur.fetchall():
                conn.rollback()
            for statement in _UNDO_THREE_WRITES:
                cur.execute(statement + " RETURNING 1")
                assert cur.fetchall(), statement
            conn.commit()
        report = load.stop()
    assert sorted(m.kind for m in report.missing_writes) == [
        "gone public.sessions", "write public.accounts", "write public.invoices"
    ], report.missing_writes
    assert len(report.problems()) == 1, report.problems()


# Rows the load does not write again: the oldest family's account (key updates and deletes
# take the latest), an invoice of an existing account (invoices are never updated), and a
# session the load deleted, back with its id (ids are never given again).
_OLDEST_FAMILY = "SELECT n FROM live_load.families ORDER BY n LIMIT 1 FOR UPDATE"
_AN_INSERTED_INVOICE = (  # of an account the load picks: one the load inserted
    "SELECT i.ctid FROM invoices i JOIN live_load.ledger l ON l.tbl = 'public.invoices' "
    "AND l.expect = jsonb_build_object('account_uuid', i.account_uuid, 'amount', "
    "i.amount::text, 'note', i.note) JOIN live_load.picks p ON p.key = i.account_uuid LIMIT 1")
_UNDO_THREE_WRITES = (
    "UPDATE accounts SET email = 'changed-' || email WHERE uuid = "
    "(SELECT parent_key FROM live_load.families ORDER BY n LIMIT 1)",
    f"DELETE FROM invoices WHERE ctid = ({_AN_INSERTED_INVOICE})",
    "INSERT INTO sessions (id, account_uuid, token) SELECT (l.ident ->> 'id')::bigint, "
    "(SELECT key FROM live_load.picks WHERE n = 1), 'back' FROM live_load.ledger l "
    "WHERE (l.tbl, l.op) = ('public.sessions', 'gone') ORDER BY l.seq LIMIT 1",
)


def test_rehearse_live_load_on_a_schema_from_a_file(sandbox: Sandbox, tmp_path: Path) -> None:
    """The whole rehearsal with ``--schema-from`` and ``--live-load``: the load made for its
    tables, and what it saw in the report.  With the command's ``--lock-timeout`` (100 ms):
    with the dataclass's 3000 ms, longer than ``deadlock_timeout`` (1 s), the load's
    cascading delete was once a deadlock's victim, the engine's wait outlasting its own."""
    schema = tmp_path / "own.sql"
    schema.write_text(OWN_SCHEMA)
    report = rehearse(sandbox.admin_dsn_for("postgres"), RehearsalOptions(
        schema_from=str(schema), key=parse_key(OWN_KEY), users=100, batch_sizes=(50,),
        dirty=False, live_load=True, lock_timeout_ms=100))
    assert report.passed, report.problems()
    assert report.live_load is not None
    assert [p.name for p in report.live_load.phases] == ["before", *STEPS, "after"]
    assert report.live_load.transactions > 0
    text = render_text(report)
    assert "no application transaction failed, every committed write is there" in text
    assert "not written: updates of public.invoices: its rows have no identity" in text


# An invoice recorded gone, then written again with another key and the rest unchanged.
_REKEYED_INVOICES = """
SELECT count(*) FROM live_load.ledger g JOIN live_load.ledger w
  ON (w.tbl, w.op, g.op) = (g.tbl, 'write', 'gone') AND w.seq > g.seq
 AND g.expect - 'account_uuid' = w.expect - 'account_uuid'
 AND g.expect ->> 'account_uuid' <> w.expect ->> 'account_uuid'
WHERE g.tbl = 'public.invoices'
"""


def _families_changed(dsn: str, after: object = 0) -> bool:
    """Rows of a family gone from invoices (its key updated, or deleted) and from sessions
    (deleted), recorded after the ledger's entry ``after``."""
    return bool(execute(dsn, _CHANGED, (after,))[0][0])


_CHANGED = """
SELECT bool_and(EXISTS (SELECT FROM live_load.ledger l WHERE l.tbl = t AND l.op = 'gone'
                        AND l.seq > %s))
FROM unnest(ARRAY['public.invoices', 'public.sessions']) t
"""
