"""A database and its fingerprint before the migration, for the rollback tests.

They take a clone of a seeded database (the ``scenario`` fixture in
``tests/conftest.py``), drive the engine to a stage or kill it at a fault point, and
compare with ``original`` and ``migrated``.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg2
import pytest

from migration.rehearsal.fingerprint import Fingerprint
from tests.operate import print_of, run_in_process

SEED_USERS = 12  # with batches of 7: two batches for users, more for each child
ORPHAN = "00000000-0000-4000-8000-0000000000cc"
UPPER = "ABCDEF01-2345-4678-9ABC-DEF012345678"


@dataclass
class Scenario:
    dsn: str
    admin_dsn: str
    original: Fingerprint
    migrated: Fingerprint | None  # expected after a full migration (clean data only)

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
