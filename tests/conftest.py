"""Hypothesis profiles, and the fixtures more than one test module uses.

The Hypothesis profiles are chosen with HYPOTHESIS_PROFILE (default dev).

dev: quick local runs.  ci: Hypothesis' own ci profile (derandomized, no
deadline, no example database), at the same size as dev (but for the property
tests of tests/test_properties.py, a migration each, which take ten).  deep: many more
examples, for the deep tox env.  Examples touch a real database, whose speed
varies, so no profile has a deadline.
"""

import itertools
import os
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest
from hypothesis import settings

from migration.rehearsal.fingerprint import expected_after_migration
from migration.rehearsal.sandbox import Sandbox
from tests.operate import (
    MIGRATED_DEFAULTS,
    PLAN_KEYS,
    SEEDED_USERS,
    connected,
    execute,
    print_of,
    seeded,
)
from tests.scenario import ORPHAN, SEED_USERS, Scenario
from tests.shapes import NO_PRIMARY_KEY, NO_PRIMARY_KEY_ROWS

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile("ci", settings.get_profile("ci"), max_examples=25)
settings.register_profile("deep", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

_numbers = itertools.count()


@pytest.fixture(scope="module")
def seeded_templates(sandbox: Sandbox) -> Iterator[dict[str, str]]:
    """A seeded database per schema variant (the no-FK one with an orphan reminder), to
    clone: the name of each."""
    names = {}
    for variant in ("legacy", "legacy_no_fk"):
        name = f"{sandbox.prefix}_seeded_{variant}"
        sandbox.drop_database(name)
        dsn = sandbox.create_database(name, variant=variant)
        seeded(dsn, users=SEED_USERS)
        if variant == "legacy_no_fk":
            execute(dsn, "UPDATE reminders SET user_id = %s WHERE id = "
                         "(SELECT min(id) FROM reminders WHERE user_id IS NOT NULL)", (ORPHAN,))
        names[variant] = name
    yield names
    for name in names.values():
        sandbox.drop_database(name)


@pytest.fixture
def scenario(sandbox: Sandbox, seeded_templates: dict[str, str]
             ) -> Iterator[Callable[..., Scenario]]:
    """Makes scenarios: fresh clones of the seeded databases, dropped afterwards."""
    made: list[str] = []

    def make(variant: str = "legacy", *, copy_of: Scenario | None = None) -> Scenario:
        """A clone of the seeded ``variant``; or of ``copy_of``'s database as it is now
        (nobody connected to it), with its fingerprints from before (a sweep of the
        rollback's points clones one migrated database instead of migrating each)."""
        name = f"{sandbox.prefix}_scenario_{next(_numbers)}"
        source = (urlsplit(copy_of.dsn).path.lstrip("/") if copy_of is not None
                  else seeded_templates[variant])
        dsn = sandbox.clone(source, name)
        made.append(name)
        if copy_of is not None:
            return Scenario(dsn, sandbox.admin_dsn_for(name), copy_of.original, copy_of.migrated)
        migrated = None
        if variant == "legacy":
            with connected(dsn, autocommit=False) as conn:
                migrated = expected_after_migration(conn, PLAN_KEYS, defaults=MIGRATED_DEFAULTS)
        return Scenario(dsn, sandbox.admin_dsn_for(name), print_of(dsn), migrated)

    yield make
    for name in made:
        sandbox.drop_database(name)


@pytest.fixture
def shaped(legacy_db: str, sandbox: Sandbox) -> Callable[..., Scenario]:
    """Makes the scenario of a carried-object test, on this test's legacy database:
    ``seeded`` with ``users`` and the shapes given, its fingerprint taken."""

    def make(*shapes: str, users: int = SEEDED_USERS) -> Scenario:
        seeded(legacy_db, *shapes, users=users)
        admin = sandbox.admin_dsn_for(urlsplit(legacy_db).path.lstrip("/"))
        return Scenario(legacy_db, admin, print_of(legacy_db), None)

    return make


@pytest.fixture
def no_pk_db(legacy_db: str) -> str:
    """A seeded legacy database with ``user_roles`` (no key at all) and ``user_devices``
    (a unique index only), both referring to users, upper-case ids among them."""
    return seeded(legacy_db, NO_PRIMARY_KEY, NO_PRIMARY_KEY_ROWS, users=60)
