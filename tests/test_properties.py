"""Property tests: generated legacy datasets, clean and dirty, through the whole migration.

Each example gets its own database (a clone of the schema template), loaded
with one statement per table; the function-scoped fixtures only provide the
sandbox, so the health check about them does not apply.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migration.cli import QUARANTINE_OPERATIONS
from migration.rehearsal.fingerprint import expected_after_migration
from migration.rehearsal.sandbox import Sandbox
from tests.loader import load
from tests.operate import (
    MIGRATED_DEFAULTS,
    PLAN_KEYS,
    connected,
    operate,
    print_of,
    run_ok,
)
from tests.strategies import Dataset, datasets

# The engine under generated data: on the oldest and the newest server.
pytestmark = pytest.mark.edges

_numbers = itertools.count()
# Each example is a whole migration on a database of its own (2 s and more).  The ci
# profile, derandomized (the same examples on every run), takes ten, which still cover each
# kind of planted dirt, batch size and stage; dev and deep, exploring, keep their counts.
CI_EXAMPLES = 10
EXAMPLES = settings(max_examples=CI_EXAMPLES if settings().derandomize
                    else settings().max_examples,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@contextmanager
def loaded(sandbox: Sandbox, dataset: Dataset, variant: str) -> Iterator[str]:
    with sandbox.database(f"{sandbox.prefix}_prop_{next(_numbers)}", variant=variant) as dsn:
        with connected(dsn, autocommit=False) as conn:
            load(conn, dataset)
            conn.commit()
        yield dsn


@EXAMPLES
@given(dataset=datasets(max_users=6), batch_size=st.sampled_from([1, 7, 1000]))
def test_a_clean_dataset_migrates_to_exactly_its_uuid_image(
        sandbox: Sandbox, dataset: Dataset, batch_size: int) -> None:
    """Every key equals its string cast to uuid, every other value and NULL is unchanged,
    the schema is the legacy one with uuid keys (same names and definitions)."""
    with loaded(sandbox, dataset, "legacy") as dsn:
        with connected(dsn, autocommit=False) as conn:
            expected = expected_after_migration(conn, PLAN_KEYS, defaults=MIGRATED_DEFAULTS)
        run_ok(dsn, "full_migration", f"--batch-size={batch_size}")
        after = print_of(dsn)
        assert after == expected, "\n".join(expected.diff(after))
        run_ok(dsn, "validate_migration")


def _offending_values(dataset: Dataset) -> set[str]:
    planted = dataset.planted
    values = {ref.value for ref in planted.invalid_ids | planted.orphans}
    values |= {spelling for pair in planted.collisions for spelling in pair}
    return values


@EXAMPLES
@given(dataset=datasets(max_users=5, clean=False, foreign_keys=False, respelled_children=False,
                        invalid_ids=None, collisions=None, orphans=None)
       .filter(lambda d: bool(_offending_values(d))))
def test_dirty_data_is_refused_naming_the_rows_and_nothing_changes(
        sandbox: Sandbox, dataset: Dataset) -> None:
    with loaded(sandbox, dataset, "legacy_no_fk") as dsn:
        before = print_of(dsn, include_backup=True)
        result = operate(dsn, "full_migration")
        assert result.exit_code == 1, result.output
        unnamed = {value for value in _offending_values(dataset)
                   if repr(value) not in result.output and value not in result.output}
        assert not unnamed, f"{unnamed} not named in:\n{result.output}"
        after = print_of(dsn, include_backup=True)
        assert after == before, "\n".join(before.diff(after))


STAGES = {
    "backup_data": ("backup_data",),
    "migrate_users": ("backup_data", "migrate_users"),
    "migrate_foreign_keys": ("backup_data", "migrate_users", "migrate_foreign_keys"),
    "validate_migration": ("full_migration",),
}


@EXAMPLES
@given(dataset=datasets(max_users=5, clean=False, foreign_keys=False, invalid_ids=False,
                        collisions=False),
       stage=st.sampled_from(list(STAGES)), batch_size=st.sampled_from([1, 3, 1000]))
def test_rollback_from_any_stage_restores_a_generated_dataset(
        sandbox: Sandbox, dataset: Dataset, stage: str, batch_size: int) -> None:
    """Orphans (quarantined on the way) and children spelling their user differently
    included: the rollback gives back every row with its original spelling."""
    with loaded(sandbox, dataset, "legacy_no_fk") as dsn:
        before = print_of(dsn)
        for step in STAGES[stage]:
            orphans = ["--orphans=quarantine"] if step in QUARANTINE_OPERATIONS else []
            run_ok(dsn, step, *orphans, f"--batch-size={batch_size}")
        run_ok(dsn, "rollback")
        after = print_of(dsn)
        assert after == before, "\n".join(before.diff(after))
