"""A state machine whose rules are the operations and crashes, checked after every rule.

Invariants: no original row is ever unrecoverable (it is in its table, in
the backup or in quarantine); a successful rollback gives back the original
fingerprint (the original schema, and the original data unless the
application wrote in between); a successful full migration validates; a
refused operation changed nothing.  The application writes between the
operations, at any stage (the writer of ``tests/app_writer.py``, each write
ending as it does on a twin with no migration): its committed rows are never
lost, and its deletes never come back.  The database has an orphan in a table
without foreign key, so both ``--orphans`` modes matter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import secrets

import psycopg2
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from psycopg2 import sql

from migration.cli import QUARANTINE_OPERATIONS
from migration.errors import MigrationError
from migration.rehearsal.fingerprint import Fingerprint
from migration.rehearsal.sandbox import Sandbox
from migration.session import Settings
from tests.app_writer import (
    BY_NAME,
    Twin,
    Writer,
    app_dsn,
    canonical,
    ensure_app_role,
    grant_app_role,
    write_both,
    writes_to,
)
from tests.operate import connected, execute, operate, print_of, run_in_process, seeded
from tests.strategies import AppWrite

# The engine under generated operations and crashes: on the oldest and the newest server.
pytestmark = pytest.mark.edges

OPERATIONS = ("validate_schema", "backup_data", "migrate_users", "migrate_foreign_keys",
              "validate_migration", "full_migration", "rollback", "cleanup_backup")
ORPHANS = st.sampled_from(["--orphans=abort", "--orphans=quarantine"])
TABLES = ("users", "journal_entries", "tags", "reminders")
WRITTEN = [BY_NAME[table] for table in ("users", "journal_entries", "reminders")]
"""The tables the application writes here.  Not tags, where the orphan is: once it is
quarantined the twin, which keeps it, would find other tags by the same pick."""
ORPHANING = {"delete@users", "update_key@users", "@reminders:ref:new",
             "@reminders:ref:respelled"}
"""Writes left out here: tags and reminders have no foreign key, and these would leave
them orphans, which a quarantine moves out of the twin's sight."""
_numbers = itertools.count()


def primary_keys(dsn: str, schema: str, table: str) -> set[str]:
    """Text of every id in a table (uuid ids print canonically, like the seed's)."""
    relation = sql.Identifier(schema, table)
    with connected(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (relation.as_string(conn),))
        if not (cur.fetchone() or [False])[0]:
            return set()
        cur.execute(sql.SQL("SELECT id::text FROM {}").format(relation))
        return {str(canonical(row[0])) for row in cur.fetchall()}


class MigrationMachine(RuleBasedStateMachine):
    sandbox: Sandbox
    template: str
    password: str

    def __init__(self) -> None:
        super().__init__()
        self.name = f"{self.sandbox.prefix}_machine_{next(_numbers)}"
        self.dsn = self.sandbox.clone(self.template, self.name)
        self.admin_dsn = self.sandbox.admin_dsn_for(self.name)
        self.twin = Twin(self.sandbox.clone(self.template, f"{self.name}_twin"),
                         app_dsn(self.sandbox, self.password, f"{self.name}_twin"), WRITTEN)
        self.writer = Writer(app_dsn(self.sandbox, self.password, self.name), WRITTEN)
        self.original: Fingerprint = print_of(self.dsn)
        self.ids = {table: primary_keys(self.dsn, "public", table) for table in TABLES}
        self.written: dict[str, set[str]] = {table: set() for table in TABLES}
        self.deleted: dict[str, set[str]] = {table: set() for table in TABLES}
        self.wrote = False

    @rule(operation=st.sampled_from(OPERATIONS), orphans=ORPHANS)
    def operate(self, operation: str, orphans: str) -> None:
        before = print_of(self.dsn, include_backup=True)
        # --orphans=quarantine is a usage error where nothing quarantines
        given = [orphans] if operation in QUARANTINE_OPERATIONS else []
        result = operate(self.dsn, operation, *given)
        assert result.exit_code in (0, 1), result.output
        if result.exit_code == 1 and ("refused" in result.output
                                      or "nothing to roll back" in result.output):
            after = print_of(self.dsn, include_backup=True)
            assert after == before, "\n".join(before.diff(after))
        if operation == "rollback" and result.exit_code == 0:
            after = print_of(self.dsn)
            expected = self.original if not self.wrote else dataclasses.replace(
                self.original, data=after.data)
            assert after == expected, "\n".join(expected.diff(after))
        if operation == "full_migration" and result.exit_code == 0:
            assert operate(self.dsn, "validate_migration").exit_code == 0

    @rule(operation=st.sampled_from(OPERATIONS[1:]), point=st.integers(1, 40))
    def crash(self, operation: str, point: int) -> None:
        """Kill the engine's connection at the n-th fault point it reaches (if it gets there).

        One fill connection, so that the n-th point is the same on every replay.
        """
        with contextlib.suppress(psycopg2.OperationalError, MigrationError):
            run_in_process(self.dsn, operation, admin_dsn=self.admin_dsn, crash_after=point,
                           settings=Settings(batch_size=7, jobs=1, show_progress=False))

    @rule(writes=writes_to(WRITTEN, excluded=ORPHANING, max_size=4))
    def application_writes(self, writes: list[AppWrite]) -> None:
        """The application goes on, whatever the stage: each write ends as it does on the
        twin, which no migration touches; what its writes added and removed is what they
        added to and removed from the twin."""
        differ, theirs = write_both(self.writer, self.twin, self.dsn, writes)
        assert not differ, "\n".join(differ)
        self.wrote |= any(done.sqlstate is None and done.rows for done in theirs)
        for table in TABLES:
            now = primary_keys(self.twin.dsn, "public", table)
            self.written[table] = now - self.ids[table]
            self.deleted[table] = self.ids[table] - now

    @rule()
    def status(self) -> None:
        result = operate(self.dsn, "status")
        assert result.exit_code == 0
        assert "stage: " in result.output

    @invariant()
    def nothing_is_lost(self) -> None:
        for table, ids in self.ids.items():
            live = primary_keys(self.dsn, "public", table)
            kept = (live
                    | primary_keys(self.dsn, "migration_backup", f"public.{table}")
                    | primary_keys(self.dsn, "migration_backup", f"quarantine.public.{table}"))
            lost = ids - kept - self.deleted[table]  # the application's deletes are not losses
            assert not lost, f"{table}: lost {sorted(lost)[:5]}"
            assert self.written[table] <= live, \
                f"{table}: the application's rows lost {sorted(self.written[table] - live)[:5]}"
            assert not self.deleted[table] & live, f"{table}: deleted rows came back"

    def teardown(self) -> None:
        self.writer.close()
        self.twin.close()
        self.sandbox.drop_database(self.name)
        self.sandbox.drop_database(f"{self.name}_twin")


def test_any_sequence_of_operations_and_crashes_loses_nothing(sandbox: Sandbox) -> None:
    template = f"{sandbox.prefix}_machine_template"
    sandbox.drop_database(template)
    dsn = sandbox.create_database(template, variant="legacy_no_fk")
    seeded(dsn, users=10)
    execute(dsn, "UPDATE tags SET user_id = '00000000-0000-4000-8000-0000000000dd' "
                 "WHERE id = (SELECT min(id) FROM tags)")
    password = secrets.token_urlsafe(12)
    ensure_app_role(sandbox, password)
    grant_app_role(dsn)
    MigrationMachine.sandbox, MigrationMachine.template = sandbox, template
    MigrationMachine.password = password
    try:
        # Each step is a migration run: a few sequences by default, many in the deep profile.
        run_state_machine_as_test(MigrationMachine, settings=settings(
            max_examples=max(3, settings().max_examples // 8), stateful_step_count=10,
            deadline=None))
    finally:
        sandbox.drop_database(template)
