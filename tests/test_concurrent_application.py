"""The application writes through every stage of the migration and of the rollback.

The engine is stopped at a fault point of each stage (its connection killed there, as a
crash would), the application's writes drawn by hypothesis run on their own connection,
and the engine resumes.  The writes are every kind the application may make
(``strategies.APP_WRITE_KINDS``, and those under ``session_replication_role = replica``),
with keys that exist, that exist spelled otherwise, new ones, NULL and invalid ones.
The oracle is the twin (``tests/app_writer.py``): a clone given the same writes with no
migration running.  Every write the twin accepts must be accepted, every write it refuses
refused with the same SQLSTATE, each touching as many rows; at the end both hold the
same data by value, and ``verify`` passes.  After some batches the application leaves the
keys that are not UUIDs it wrote (the original schema takes them): the migration must then
refuse, naming each, and go on once the application has removed them on both sides.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import psycopg2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from migration.errors import MigrationError
from migration.rehearsal.sandbox import Sandbox
from migration.session import Settings
from tests.app_writer import (
    TABLES,
    Twin,
    Writer,
    app_dsn,
    build_template,
    ensure_app_role,
    key_type,
    not_uuids,
    table_values,
    value_diff,
    write_both,
    writes_to,
)
from tests.operate import execute, run_in_process, run_verify, seeded
from tests.strategies import AppWrite, KeyPick

# The engine under concurrent writers: on the oldest and the newest server.
pytestmark = pytest.mark.edges


class Batch(NamedTuple):
    writes: list[AppWrite]
    fix: bool  # whether the application removes the keys that are not UUIDs it wrote


class Stop(NamedTuple):
    stage: str
    point: str  # the fault point the engine is stopped at


FORWARD = (
    Stop("after the backup", "add id_uuid to public.users#1"),
    Stop("users' fill", "batch public.users.id#2"),
    Stop("children's fill", "batch public.journal_entries.user_id#1"),
    Stop("after the proofs", "index ix_journal_entries_user_created#1"),
    Stop("after the indexes", "fk journal_entries_user_id_fkey#1"),
    Stop("after the foreign keys", "swap#1"),
    Stop("after the swap", "analyze public.users.id#1"),
)
BACKWARD = (
    Stop("rollback: users' fill", "batch public.users.id#2"),
    Stop("rollback: children respelled", "add migration_filled_id#1"),
    Stop("rollback: before its swap", "swap#1"),
    Stop("rollback: after its swap", "analyze public.users.id#1"),
)
# The application here writes in tight loops, so its tables are seldom free at once: the
# engine queues for its locks after 0.6 s of refused tries (lock_timeout x ddl_attempts)
# rather than 3 s, which only the swap's and the expansion's waits, not the writes, see.
ENGINE = Settings(batch_size=7, jobs=1, lock_timeout_ms=20, show_progress=False)
_numbers = itertools.count()


class App:
    """The template the scenarios clone, and what reaches its server.  Not a dataclass:
    hypothesis prints a failing example's arguments field by field, passwords included,
    where a class of its own is printed by its repr."""

    def __init__(self, sandbox: Sandbox, template: str, password: str) -> None:
        self.sandbox, self.template, self.password = sandbox, template, password

    def __repr__(self) -> str:
        return f"App(template={self.template!r})"


@pytest.fixture(scope="module")
def app(sandbox: Sandbox) -> Iterator[App]:
    """A seeded legacy template with the application's tables and role."""
    password = secrets.token_urlsafe(12)
    ensure_app_role(sandbox, password)
    template = f"{sandbox.prefix}_app_template"
    sandbox.drop_database(template)
    dsn = sandbox.create_database(template, variant="legacy")
    seeded(dsn, users=8)
    build_template(dsn)
    try:
        yield App(sandbox, template, password)
    finally:
        sandbox.drop_database(template)


@pytest.fixture(scope="module")
def migrated_app(app: App) -> Iterator[str]:
    """The app's template after an uninterrupted ``full_migration``, to clone: its name."""
    name = f"{app.template}_migrated"
    app.sandbox.drop_database(name)
    run_in_process(app.sandbox.clone(app.template, name), "full_migration", settings=ENGINE)
    try:
        yield name
    finally:
        app.sandbox.drop_database(name)


def batches(count: int, size: int = 6) -> st.SearchStrategy[list[Batch]]:
    """One batch of up to ``size`` writes for each stop, and one before and after."""
    return st.lists(st.builds(Batch, writes_to(TABLES, max_size=size), st.booleans()),
                    min_size=count, max_size=count)


@dataclass
class Scenario:
    """A migrating database, its twin, the application on each, and what they did."""

    app: App
    migrated: str | None = None  # the template of the migrating side, if not app's
    names: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        number = next(_numbers)
        self.dsn = self._clone(f"app_{number}", self.migrated)
        twin = self._clone(f"app_{number}_twin")
        self.admin_dsn = self.app.sandbox.admin_dsn_for(self.names[0])
        self.writer = Writer(app_dsn(self.app.sandbox, self.app.password, self.names[0]))
        self.twin = Twin(twin, app_dsn(self.app.sandbox, self.app.password, self.names[1]))

    def _clone(self, suffix: str, template: str | None = None) -> str:
        name = f"{self.app.sandbox.prefix}_{suffix}"
        self.names.append(name)
        return self.app.sandbox.clone(template or self.app.template, name)

    def close(self) -> None:
        self.writer.close()
        self.twin.close()
        for name in self.names:
            self.app.sandbox.drop_database(name)

    def writes(self, stage: str, batch: Batch) -> None:
        """The writes on both sides; every outcome that differs is a mismatch."""
        differ, _ = write_both(self.writer, self.twin, self.dsn, batch.writes, fix=batch.fix)
        self.mismatches += [f"{stage}: {line}" for line in differ]

    def engine(self, operation: str, stop: Stop | None = None) -> None:
        """The operation, to its end or killed at ``stop``; refused first, while the
        application has left keys that are not UUIDs in the columns it converts (as the
        twin holds them: the original schema took them)."""
        left = not_uuids(self.twin.dsn) if key_type(self.twin.dsn) != "uuid" else []
        if left and operation == "full_migration":
            self._refused(operation, left)
        reached: list[str] = []
        try:
            run_in_process(self.dsn, operation, admin_dsn=self.admin_dsn, settings=ENGINE,
                           crash_at=stop.point if stop else None, reached=reached)
        except psycopg2.OperationalError:
            assert stop is not None, f"{operation} lost its connection: {reached[-1:]}"
            assert stop.point in reached, f"{operation} failed before {stop.point}"
            self._wait_for_the_killed_backend()
        except MigrationError as exc:
            findings = [finding.render() for finding in exc.findings if finding.status == "fail"]
            raise AssertionError("\n".join([f"{operation} failed: {exc}", *findings,
                                            "after these writes:", *self.mismatches])) from None
        else:
            assert stop is None, f"{operation} ended before {stop.point}: {reached}"

    def _refused(self, operation: str, left: list[str]) -> None:
        """The operation must refuse, naming each of ``left``, before it changes
        anything; then the application removes those rows, on both sides."""
        try:
            run_in_process(self.dsn, operation, settings=ENGINE)
        except MigrationError as exc:
            said = "\n".join([str(exc), *(finding.render() for finding in exc.findings)])
            unnamed = [text for text in left if repr(text) not in said]
            assert not unnamed, "\n".join([f"{operation} refused without naming {unnamed}:",
                                           said, "after these writes:", *self.mismatches])
        else:
            raise AssertionError("\n".join([f"{operation} took keys that are not UUIDs: "
                                            f"{left}", "after these writes:", *self.mismatches]))
        for writer in (self.writer, self.twin.writer):
            assert writer.clean_up(left).sqlstate is None

    def _wait_for_the_killed_backend(self) -> None:
        """pg_terminate_backend only signals: the next run needs the run lock it held."""
        while execute(self.admin_dsn, "SELECT 1 FROM pg_stat_activity WHERE datname = "
                                      "current_database() AND pid <> pg_backend_pid() "
                                      "AND application_name LIKE 'uuid-migration pid %%'"):
            time.sleep(0.05)

    def check(self) -> None:
        """No write the twin took was refused, nor the other way; the same data."""
        assert not self.mismatches, "\n".join(self.mismatches)
        diff = value_diff(table_values(self.twin.dsn), table_values(self.dsn))
        assert not diff, "\n".join(diff)


@contextmanager
def scenario(app: App, migrated: str | None = None) -> Iterator[Scenario]:
    made = Scenario(app, migrated)
    try:
        yield made
    finally:
        made.close()


SERVER_EXAMPLES = settings(max_examples=6, deadline=None,
                           suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                  HealthCheck.too_slow,
                                                  HealthCheck.data_too_large])


def forward(app: App, writes: list[Batch]) -> None:
    with scenario(app) as run:
        run.writes("before the migration", writes[0])
        for stop, batch in zip(FORWARD, writes[1:], strict=False):
            run.engine("full_migration", stop)
            run.writes(stop.stage, batch)
        run.engine("full_migration")
        run.writes("after the migration", writes[-1])
        run.check()
        outcome = run_verify(run.dsn)
        assert outcome.exit_code == 0, outcome.output


def backward(app: App, migrated: str, writes: list[Batch]) -> None:
    """From a clone of ``migrated`` (``full_migration`` run on the app's template): the
    migration each example would run first is run once for them all."""
    with scenario(app, migrated) as run:
        run.writes("after the migration", writes[0])
        for stop, batch in zip(BACKWARD, writes[1:], strict=False):
            run.engine("rollback", stop)
            run.writes(stop.stage, batch)
        run.engine("rollback")
        run.writes("after the rollback", writes[-1])
        run.check()


def _not_a_uuid(*, fix: bool) -> Batch:
    """A user whose id is no UUID, and a journal entry of it."""
    invalid = KeyPick("invalid", text="not-a-uuid")
    return Batch([AppWrite("insert", "users", invalid, KeyPick("default"), "not"),
                  AppWrite("insert", "journal_entries", KeyPick("default"), invalid, "not")],
                 fix)


@SERVER_EXAMPLES
@given(writes=batches(len(FORWARD) + 2))
@example(writes=[_not_a_uuid(fix=False), Batch([], fix=True), _not_a_uuid(fix=True),
                 _not_a_uuid(fix=False), *[Batch([], fix=True)] * 5])
def test_the_application_writes_through_every_stage_of_the_migration(
        app: App, writes: list[Batch]) -> None:
    forward(app, writes)


@SERVER_EXAMPLES
@given(writes=batches(len(BACKWARD) + 2))
def test_the_application_writes_through_every_stage_of_the_rollback(
        app: App, migrated_app: str, writes: list[Batch]) -> None:
    backward(app, migrated_app, writes)


@pytest.mark.slow
@settings(SERVER_EXAMPLES, max_examples=max(6, settings().max_examples // 10))
@given(forth=batches(len(FORWARD) + 2, 16), back=batches(len(BACKWARD) + 2, 16))
def test_the_application_writes_more_through_the_migration_and_the_rollback(
        app: App, migrated_app: str, forth: list[Batch], back: list[Batch]) -> None:
    """The long version, for the deep profile: more writes at each stop, more examples."""
    forward(app, forth)
    backward(app, migrated_app, back)


def test_verify_fails_when_a_row_changed_behind_the_change_log(app: App) -> None:
    """The other half of verify's verdict: a write that is no application's (the change
    log's trigger disabled around it) is found, where the application's were passed."""
    with scenario(app) as run:
        run.engine("full_migration")
        assert run_verify(run.dsn).exit_code == 0
        execute(run.dsn, "ALTER TABLE journal_entries DISABLE TRIGGER migration_change_log;"
                         "WITH last AS (SELECT id FROM users ORDER BY id DESC LIMIT 1) "
                         "UPDATE journal_entries SET user_id = (SELECT id FROM last) WHERE id = "
                         "(SELECT min(id) FROM journal_entries "
                         " WHERE user_id <> (SELECT id FROM last));"
                         "ALTER TABLE journal_entries ENABLE TRIGGER migration_change_log")
        outcome = run_verify(run.dsn)
        assert outcome.exit_code == 1, outcome.output
        assert "public.journal_entries" in outcome.output
