"""A database, its fingerprint before the migration, and the runbook driven through it.

The rollback tests take a clone of a seeded database (the ``scenario`` fixture in
``tests/conftest.py``), drive the engine to a stage or kill it at a fault point, and
compare with ``original`` and ``migrated``.  The carried-object tests set up a shape on a
seeded legacy database (the ``shaped`` fixture) and run :meth:`Scenario.round_trip`, as
pgroll's ``TestCase{afterStart, afterComplete, afterRollback}``: a check after each phase,
and the round trip built in, the database after the rollback exactly the one before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import psycopg2
import pytest

from migration.rehearsal.fingerprint import Fingerprint
from tests.operate import print_of, run_in_process, run_ok

SEED_USERS = 12  # with batches of 7: two batches for users, more for each child
ORPHAN = "00000000-0000-4000-8000-0000000000cc"
UPPER = "ABCDEF01-2345-4678-9ABC-DEF012345678"

Check = Callable[[str], None]
"""A phase's assertions, given the database's DSN."""


@dataclass
class Scenario:
    dsn: str
    admin_dsn: str
    original: Fingerprint
    migrated: Fingerprint | None  # expected after a full migration (clean data only)

    @property
    def database(self) -> str:
        """The database's name: a sweep drops each point's clone as soon as it is checked."""
        return urlsplit(self.dsn).path.lstrip("/")

    def crash(self, operation: str, point: str) -> None:
        """Run ``operation`` and kill its connection when it reaches ``point``."""
        with pytest.raises(psycopg2.OperationalError):
            run_in_process(self.dsn, operation, admin_dsn=self.admin_dsn, crash_at=point)

    def stage(self) -> str:
        return str(run_in_process(self.dsn, "status").details["stage"])

    def assert_original(self) -> None:
        after = print_of(self.dsn)
        assert after == self.original, "\n".join(self.original.diff(after))

    def assert_migrated(self) -> None:
        assert self.migrated is not None
        after = print_of(self.dsn)
        assert after == self.migrated, "\n".join(self.migrated.diff(after))

    def round_trip(self, *, after_expand: Check | None = None, after_swap: Check | None = None,
                   after_rollback: Check | None = None, options: Sequence[str] = ()) -> None:
        """Migrate, verify and roll back as an operator would, ``after_*`` checked between
        the steps; then the database is exactly ``original``, by fingerprint.

        ``after_expand`` runs once every column is expanded and proven but not swapped
        (``full_migration --postpone-swap``, then the same run again swaps): without it the
        migration is one ``full_migration``, as most tests need.  ``after_swap`` runs once
        ``validate_migration`` has passed, ``after_rollback`` once ``rollback`` has.
        ``options`` (what a run accepts instead of refusing) go to each ``full_migration``
        and to the ``rollback``."""
        if after_expand is not None:
            run_ok(self.dsn, "full_migration", "--postpone-swap", *options)
            after_expand(self.dsn)
        run_ok(self.dsn, "full_migration", *options)
        run_ok(self.dsn, "validate_migration")
        if after_swap is not None:
            after_swap(self.dsn)
        run_ok(self.dsn, "rollback", *options)
        if after_rollback is not None:
            after_rollback(self.dsn)
        self.assert_original()
