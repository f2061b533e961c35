"""Partitioned tables and inheritance: carried through, or refused before anything is done.

A partitioned ``journal_entries`` (by range on ``created_at``, primary key
``(id, created_at)``) is migrated: its copy column, fill, proofs, indexes
(built per partition and attached) and FK (added per partition and taken
over by the table's) all go through, and the swap gives every partition's
index and FK its original name; a primary key or unique constraint over the
key comes back on every level.  A partitioned ``users`` and inheritance
(``INHERITS``) are refused by the pre-flight, with the database untouched.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import psycopg2
import psycopg2.errors
import pytest
from click.testing import CliRunner
from psycopg2 import sql

from migration import verify
from migration.catalog import relation_bytes
from migration.model import Table, shadow_name
from migration.rehearsal.fingerprint import Fingerprint, expected_after_migration
from migration.rehearsal.sandbox import Sandbox
from migration.rehearsal.seed import seed
from tests.operate import (
    MIGRATED_DEFAULTS,
    PLAN_KEYS,
    connected,
    execute,
    operate,
    print_of,
    run_in_process,
    run_ok,
    seeded,
)

PARTITIONED_JOURNAL = """
DROP TABLE journal_entries;
CREATE TABLE journal_entries (
    id          VARCHAR(36) NOT NULL DEFAULT gen_random_uuid()::text,
    user_id     VARCHAR(36) NOT NULL
                CONSTRAINT journal_entries_user_id_fkey REFERENCES users (id) ON DELETE CASCADE,
    title       TEXT NOT NULL,
    body        TEXT,
    mood        SMALLINT CHECK (mood BETWEEN 1 AND 5),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE journal_entries_early PARTITION OF journal_entries
    FOR VALUES FROM (MINVALUE) TO ('2024-01-03');
CREATE TABLE journal_entries_mid PARTITION OF journal_entries
    FOR VALUES FROM ('2024-01-03') TO ('2024-01-04');
CREATE TABLE journal_entries_late PARTITION OF journal_entries
    FOR VALUES FROM ('2024-01-04') TO (MAXVALUE);
CREATE INDEX ix_journal_entries_user_id ON journal_entries (user_id);
CREATE INDEX ix_journal_entries_user_created ON journal_entries (user_id, created_at DESC);
"""
PARTITIONS = ("journal_entries_early", "journal_entries_mid", "journal_entries_late")
JOURNAL_INDEXES = ("ix_journal_entries_user_created", "ix_journal_entries_user_id")
SEED_USERS = 12  # the seed dates each user's three entries one day apart: one per partition
ORPHAN = "00000000-0000-4000-8000-0000000000cc"
_numbers = itertools.count()


@pytest.fixture(scope="module")
def partitioned(sandbox: Sandbox) -> Iterator[str]:
    """A seeded legacy database whose journal_entries is partitioned (a template)."""
    name = f"{sandbox.prefix}_seeded_partitioned"
    sandbox.drop_database(name)
    dsn = sandbox.create_database(name, variant="legacy")
    execute(dsn, PARTITIONED_JOURNAL)
    seeded(dsn, users=SEED_USERS)
    yield name
    sandbox.drop_database(name)


@pytest.fixture
def clone(sandbox: Sandbox, partitioned: str) -> Iterator[tuple[str, str]]:
    """A fresh copy of the partitioned database: (owner DSN, superuser DSN)."""
    name = f"{sandbox.prefix}_partitioned_{next(_numbers)}"
    dsn = sandbox.clone(partitioned, name)
    yield dsn, sandbox.admin_dsn_for(name)
    sandbox.drop_database(name)


def expected(dsn: str) -> Fingerprint:
    """The migrated fingerprint: the plan's columns uuid, and every partition's user_id."""
    keys = (*PLAN_KEYS, *(("public", partition, "user_id") for partition in PARTITIONS))
    with connected(dsn, autocommit=False) as conn:
        return expected_after_migration(conn, keys, defaults=MIGRATED_DEFAULTS)


def assert_print(dsn: str, wanted: Fingerprint) -> None:
    after = print_of(dsn)
    assert after == wanted, "\n".join(wanted.diff(after))


def index_names(dsn: str) -> dict[str, list[tuple[str, bool]]]:
    """Each journal table's indexes on user_id: (name, valid and ready), by table."""
    rows = execute(dsn, """
        SELECT t.relname, c.relname, i.indisvalid AND i.indisready
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        JOIN pg_class t ON t.oid = i.indrelid
        JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = ANY (i.indkey)
        WHERE t.relname LIKE 'journal_entries%%' AND a.attname = 'user_id'
        ORDER BY 1, 2""")
    found: dict[str, list[tuple[str, bool]]] = {}
    for table, name, valid in rows:
        found.setdefault(str(table), []).append((str(name), bool(valid)))
    return found


def test_fingerprint_reads_the_partitions(partitioned: str, sandbox: Sandbox) -> None:
    """The rollback's proof compares partitions too: they are in the fingerprint."""
    with connected(sandbox.owner_dsn(partitioned), autocommit=False) as conn:
        tables = {name for _, name in
                  (ref[:2] for ref in expected_after_migration(conn, PLAN_KEYS).schema)}
    assert {"journal_entries", *PARTITIONS} <= tables


def test_partitioned_child_is_migrated_and_rolled_back(clone: tuple[str, str]) -> None:
    dsn, _ = clone
    original, migrated = print_of(dsn), expected(dsn)
    before = index_names(dsn)
    assert sorted(before) == ["journal_entries", *sorted(PARTITIONS)]

    assert operate(dsn, "validate_schema").exit_code == 0
    run_ok(dsn, "full_migration")
    run_ok(dsn, "validate_migration")
    verified = CliRunner().invoke(verify.main, ["--database-url", dsn])
    assert verified.exit_code == 0, verified.output
    assert_print(dsn, migrated)
    types = execute(dsn, "SELECT c.relname, format_type(a.atttypid, a.atttypmod) "
                         "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
                         "WHERE c.relname LIKE 'journal_entries%%' AND a.attname = 'user_id' "
                         "AND c.relkind IN ('r', 'p') ORDER BY 1")
    assert types == sorted((t, "uuid") for t in ("journal_entries", *PARTITIONS))
    after = index_names(dsn)
    assert after == before  # same names on the table and every partition, all valid
    assert all(valid for indexes in after.values() for _, valid in indexes)
    assert len(after["journal_entries"]) == len(JOURNAL_INDEXES)
    fks = execute(dsn, "SELECT conrelid::regclass::text, conname, convalidated "
                       "FROM pg_constraint WHERE contype = 'f' "
                       "AND conrelid::regclass::text LIKE 'journal_entries%%' ORDER BY 1")
    assert fks == sorted((t, "journal_entries_user_id_fkey", True)
                         for t in ("journal_entries", *PARTITIONS))
    with pytest.raises(psycopg2.errors.ForeignKeyViolation):
        execute(dsn, "INSERT INTO journal_entries (user_id, title, created_at) "
                     "VALUES (%s, 'orphan', '2024-01-03 12:00')", (ORPHAN,))

    run_ok(dsn, "rollback")
    assert_print(dsn, original)


FIRST_PART_INDEX = shadow_name("ix", Table("public", "journal_entries_early"),
                               "journal_entries_early_user_id_created_at_idx")


@pytest.mark.parametrize("point", [
    "batch public.journal_entries.user_id#2",
    "index journal_entries_mid_user_id_idx#1",  # a partition's copy, built, not attached
    f"attach {FIRST_PART_INDEX}#1",  # attached to the table's copy, the others not yet
    "fk journal_entries_user_id_fkey#2",  # a partition's FK copy added, NOT VALID
    "validate journal_entries_user_id_fkey#3",
    "fk journal_entries_user_id_fkey#4",  # the table's, taking over its partitions'
    "swap#1",
])
def test_interrupted_migration_resumes(clone: tuple[str, str], point: str) -> None:
    dsn, admin_dsn = clone
    migrated = expected(dsn)
    run_ok(dsn, "backup_data")
    run_ok(dsn, "migrate_users")
    reached: list[str] = []
    with pytest.raises(psycopg2.OperationalError):
        run_in_process(dsn, "migrate_foreign_keys", admin_dsn=admin_dsn, crash_at=point,
                       reached=reached)
    assert point in reached
    run_ok(dsn, "migrate_foreign_keys")
    run_ok(dsn, "validate_migration")
    assert_print(dsn, migrated)
    assert all(valid for indexes in index_names(dsn).values() for _, valid in indexes)


def refused(dsn: str, table: str) -> None:
    """validate_schema and full_migration refuse, naming the table; nothing changes."""
    original = print_of(dsn)
    for operation in ("validate_schema", "full_migration"):
        result = operate(dsn, operation)
        assert result.exit_code == 1, result.output
        assert table in result.output, result.output
        assert "cannot be migrated" in result.output, result.output
    assert print_of(dsn) == original
    assert execute(dsn, "SELECT to_regnamespace('migration_backup')") == [(None,)]


def test_partitioned_users_is_refused(legacy_db: str) -> None:
    execute(legacy_db, """
        DROP TABLE journal_entries, tags, reminders, users;
        CREATE TABLE users (id VARCHAR(36) NOT NULL, email TEXT NOT NULL,
                            created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                            PRIMARY KEY (id, created_at)) PARTITION BY RANGE (created_at);
        CREATE TABLE users_all PARTITION OF users DEFAULT;
        CREATE TABLE journal_entries (id VARCHAR(36) PRIMARY KEY, user_id VARCHAR(36));
        CREATE TABLE tags (id VARCHAR(36) PRIMARY KEY, user_id VARCHAR(36));
        CREATE TABLE reminders (id VARCHAR(36) PRIMARY KEY, user_id VARCHAR(36));
        INSERT INTO users (id, email) VALUES (gen_random_uuid()::text, 'a@example.com');
        """)
    refused(legacy_db, "public.users")


def test_a_partitioned_child_without_a_key_to_walk_is_refused(legacy_db: str) -> None:
    """Its fill could walk neither a key (it has none) nor pages (they are its
    partitions'): refused before anything is done, named."""
    execute(legacy_db, """
        CREATE TABLE visits (user_id VARCHAR(36) REFERENCES users (id), day date NOT NULL)
            PARTITION BY RANGE (day);
        CREATE TABLE visits_all PARTITION OF visits DEFAULT;
        INSERT INTO visits SELECT id, current_date FROM users LIMIT 3""")
    refused(legacy_db, "public.visits")
    assert "no primary key or unique key" in operate(legacy_db, "validate_schema").output


def test_inheritance_child_is_refused(legacy_db: str) -> None:
    execute(legacy_db, "CREATE TABLE archived_reminders (archived_at timestamptz) "
                       "INHERITS (reminders)")
    refused(legacy_db, "public.reminders")
    assert "archived_reminders" in operate(legacy_db, "validate_schema").output


@pytest.mark.parametrize("point", [
    f"attach {FIRST_PART_INDEX}#1",
    "fk journal_entries_user_id_fkey#2",  # partitions' FK copies, not yet the table's
    "fk journal_entries_user_id_fkey#4",
])
def test_interrupted_migration_rolls_back(clone: tuple[str, str], point: str) -> None:
    """Discard drops the partitions' copies (attached or not) and the table's."""
    dsn, admin_dsn = clone
    original = print_of(dsn)
    with pytest.raises(psycopg2.OperationalError):
        run_in_process(dsn, "full_migration", admin_dsn=admin_dsn, crash_at=point)
    run_ok(dsn, "rollback")
    assert_print(dsn, original)


def test_sync_trigger_reaches_every_partition(clone: tuple[str, str]) -> None:
    """The copy column's sync trigger, created on the table, fires for rows written
    straight into a partition while the fill is under way."""
    dsn, admin_dsn = clone
    run_ok(dsn, "backup_data")
    run_ok(dsn, "migrate_users")
    with pytest.raises(psycopg2.OperationalError):
        run_in_process(dsn, "migrate_foreign_keys", admin_dsn=admin_dsn,
                       crash_at="batch public.journal_entries.user_id#1")
    (user,), (other,) = execute(dsn, "SELECT id FROM users ORDER BY id LIMIT 2")
    for partition in PARTITIONS:
        execute(dsn, sql.SQL("UPDATE {} SET user_id = %s, title = 'moved' "
                             "WHERE ctid = (SELECT min(ctid) FROM {})").format(
            sql.Identifier(partition), sql.Identifier(partition)), (other,))
    execute(dsn, "INSERT INTO journal_entries_late (user_id, title, created_at) "
                 "VALUES (%s, 'new', '2024-06-01')", (user,))
    copies = execute(dsn, "SELECT tableoid::regclass::text, user_id_uuid = user_id::uuid "
                          "FROM journal_entries WHERE title IN ('moved', 'new') ORDER BY 1")
    assert sorted(table for table, _ in copies) == sorted([*PARTITIONS, PARTITIONS[-1]])
    assert all(same for _, same in copies), copies


def test_partition_with_a_foreign_key_of_its_own_is_refused(clone: tuple[str, str]) -> None:
    """An FK of a partition's own brings the partition into the plan: refused, since its
    column is its table's and is migrated with it."""
    dsn, _ = clone
    execute(dsn, "ALTER TABLE journal_entries_mid ADD CONSTRAINT journal_entries_mid_own_fkey "
                 "FOREIGN KEY (user_id) REFERENCES users (id)")
    refused(dsn, "public.journal_entries_mid")
    assert "partition of public.journal_entries" in operate(dsn, "validate_schema").output


def test_unique_index_with_the_partition_key_is_carried(clone: tuple[str, str]) -> None:
    """A partitioned table's unique index holds its partition key: its copy does too,
    built per partition, and stays unique after the swap."""
    dsn, _ = clone
    execute(dsn, "CREATE UNIQUE INDEX ix_journal_entries_user_moment "
                 "ON journal_entries (user_id, created_at)")
    original, migrated = print_of(dsn), expected(dsn)
    run_ok(dsn, "full_migration")
    assert_print(dsn, migrated)
    unique = execute(dsn, "SELECT c.relname, i.indisunique, i.indisvalid FROM pg_index i "
                          "JOIN pg_class c ON c.oid = i.indexrelid "
                          "WHERE c.relname LIKE '%%user_id_created_at_idx1' "
                          "OR c.relname = 'ix_journal_entries_user_moment' ORDER BY 1")
    assert unique == sorted([("ix_journal_entries_user_moment", True, True)]
                            + [(f"{p}_user_id_created_at_idx1", True, True) for p in PARTITIONS])
    with pytest.raises(psycopg2.errors.UniqueViolation):
        execute(dsn, "INSERT INTO journal_entries (user_id, title, created_at) "
                     "SELECT user_id, 'twin', created_at FROM journal_entries LIMIT 1")
    run_ok(dsn, "rollback")
    assert_print(dsn, original)


SUBPARTITIONED = PARTITIONED_JOURNAL.replace(
    """CREATE TABLE journal_entries_late PARTITION OF journal_entries
    FOR VALUES FROM ('2024-01-04') TO (MAXVALUE);""",
    """CREATE TABLE journal_entries_late PARTITION OF journal_entries
    FOR VALUES FROM ('2024-01-04') TO (MAXVALUE) PARTITION BY HASH (id);
CREATE TABLE journal_entries_late_0 PARTITION OF journal_entries_late
    FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE journal_entries_late_1 PARTITION OF journal_entries_late
    FOR VALUES WITH (MODULUS 2, REMAINDER 1);""") + """
CREATE UNIQUE INDEX ix_journal_entries_user_entry ON journal_entries (user_id, id, created_at);
ALTER TABLE journal_entries_mid REPLICA IDENTITY USING INDEX
    journal_entries_mid_user_id_id_created_at_idx;
ALTER TABLE journal_entries_late_1 REPLICA IDENTITY USING INDEX
    journal_entries_late_1_user_id_id_created_at_idx;
COMMENT ON INDEX journal_entries_early_user_id_idx IS 'early lookups';
COMMENT ON INDEX journal_entries_late_0_user_id_idx IS 'late lookups';
CREATE PUBLICATION journal FOR TABLE journal_entries;
"""
LEAVES = ("journal_entries_early", "journal_entries_mid", "journal_entries_late_0",
          "journal_entries_late_1")
IDENTITIES = """
SELECT c.relname, c.relreplident::text, (SELECT ic.relname FROM pg_index i
    JOIN pg_class ic ON ic.oid = i.indexrelid WHERE i.indrelid = c.oid AND i.indisreplident)
FROM pg_class c WHERE c.relname LIKE 'journal_entries%%' AND c.relkind IN ('r', 'p')
ORDER BY 1
"""
INDEX_COMMENTS = ("SELECT relname, obj_description(oid, 'pg_class') FROM pg_class "
                  "WHERE relkind = 'i' AND obj_description(oid, 'pg_class') IS NOT NULL "
                  "ORDER BY 1")


def test_a_sub_partitioned_child_is_carried_with_its_partitions_own_objects(
        legacy_db: str) -> None:
    """A partition partitioned in turn: every level migrated and rolled back; a
    partition's own index comments and replica identity over the key come back; the
    disk estimate counts the partitions (a partitioned table holds nothing itself)."""
    execute(legacy_db, SUBPARTITIONED)
    with connected(legacy_db, autocommit=False) as conn:
        seed(conn, SEED_USERS)
        heap, index = relation_bytes(conn, Table("public", "journal_entries"))
        assert heap > 0
        assert index > 0
        assert relation_bytes(conn, Table("public", "users"))[0] > 0
    identities, comments = execute(legacy_db, IDENTITIES), execute(legacy_db, INDEX_COMMENTS)
    assert ("journal_entries_late_1", "i", "journal_entries_late_1_user_id_id_created_at_idx") \
        in identities
    assert len(comments) == 2
    original = print_of(legacy_db)
    # the publication takes no column list (partitions published as themselves): accepted
    run_ok(legacy_db, "full_migration", "--allow-publications")
    types = execute(legacy_db, "SELECT c.relname, format_type(a.atttypid, a.atttypmod) "
                               "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
                               "WHERE c.relname LIKE 'journal_entries%%' AND a.attname = 'user_id' "
                               "AND c.relkind IN ('r', 'p') ORDER BY 1")
    assert types == sorted((t, "uuid") for t in ("journal_entries", "journal_entries_late",
                                                  *LEAVES))
    assert execute(legacy_db, IDENTITIES) == identities
    assert execute(legacy_db, INDEX_COMMENTS) == comments
    execute(legacy_db, "UPDATE journal_entries SET title = title")  # published: identity
    with pytest.raises(psycopg2.errors.ForeignKeyViolation):
        execute(legacy_db, "INSERT INTO journal_entries (user_id, title, created_at) "
                           "VALUES (%s, 'orphan', '2024-01-05 12:00')", (ORPHAN,))
    run_ok(legacy_db, "validate_migration")
    execute(legacy_db, "ALTER TABLE journal_entries_mid REPLICA IDENTITY DEFAULT")
    result = operate(legacy_db, "validate_migration")  # mutation: a partition's identity
    assert "[FAIL] replica_identity public.journal_entries_mid: replica identity changed" \
        in " ".join(result.output.split()), result.output
    execute(legacy_db, "ALTER TABLE journal_entries_mid REPLICA IDENTITY USING INDEX "
                       "journal_entries_mid_user_id_id_created_at_idx")
    run_ok(legacy_db, "rollback", "--allow-publications")
    assert execute(legacy_db, IDENTITIES) == identities
    assert execute(legacy_db, INDEX_COMMENTS) == comments
    assert_print(legacy_db, original)


CONSTRAINT_TREE = """
SELECT c.conrelid::regclass::text, c.conname, c.contype::text, pg_get_constraintdef(c.oid),
       p.conname, i.indisvalid AND i.indisready, i.indisreplident,
       obj_description(c.conindid, 'pg_class'), obj_description(c.oid, 'pg_constraint')
FROM pg_constraint c LEFT JOIN pg_constraint p ON p.oid = c.conparentid
JOIN pg_index i ON i.indexrelid = c.conindid
WHERE c.conrelid::regclass::text LIKE 'journal_entries%%' AND c.contype IN ('p', 'u')
ORDER BY 1, 2
"""


LEAF_FILES = """
SELECT c.relfilenode FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid
WHERE i.indrelid::regclass::text LIKE 'journal_entries_%%' AND i.indisunique
  AND c.relname {} ORDER BY 1
"""


def test_partitioned_unique_constraint_on_the_key_is_carried(clone: tuple[str, str]) -> None:
    """A partitioned table's unique constraint over the key, deferrable and commented:
    its leaves' copies are built, each becomes its partition's constraint at the swap,
    and the table's, added again, takes them over (the very files built before the
    swap: nothing is built under its lock); the same tree, names and timing."""
    dsn, admin_dsn = clone
    execute(dsn, "ALTER TABLE journal_entries ADD CONSTRAINT journal_entries_one_a_day "
                 "UNIQUE (user_id, created_at) DEFERRABLE INITIALLY DEFERRED;"
                 "COMMENT ON CONSTRAINT journal_entries_one_a_day ON journal_entries "
                 "IS 'one entry a day'")
    tree = execute(dsn, CONSTRAINT_TREE)
    assert ("journal_entries_mid", "journal_entries_mid_user_id_created_at_key", "u",
            "UNIQUE (user_id, created_at) DEFERRABLE INITIALLY DEFERRED",
            "journal_entries_one_a_day", True, False, None, None) in tree
    original, migrated = print_of(dsn), expected(dsn)
    assert operate(dsn, "validate_schema").exit_code == 0
    with pytest.raises(psycopg2.OperationalError):
        run_in_process(dsn, "full_migration", admin_dsn=admin_dsn,
                       crash_at="swap#1")
    built = execute(dsn, LEAF_FILES.format("LIKE 'migration_ix_%%'"))
    assert len(built) == len(PARTITIONS)
    run_ok(dsn, "full_migration")
    assert_print(dsn, migrated)
    assert execute(dsn, CONSTRAINT_TREE) == tree
    assert execute(dsn, LEAF_FILES.format("LIKE '%%created_at_key'")) == built
    verified = CliRunner().invoke(verify.main, ["--database-url", dsn])
    assert verified.exit_code == 0, verified.output
    with pytest.raises(psycopg2.errors.UniqueViolation):
        execute(dsn, "INSERT INTO journal_entries (user_id, title, created_at) "
                     "SELECT user_id, 'twin', created_at FROM journal_entries_mid LIMIT 1")
    run_ok(dsn, "rollback")
    assert_print(dsn, original)
    assert execute(dsn, CONSTRAINT_TREE) == tree


KEYED_BY_USER = SUBPARTITIONED.replace("PRIMARY KEY (id, created_at)",
                                       "PRIMARY KEY (user_id, id, created_at)") + """
ALTER INDEX journal_entries_late_pkey RENAME TO journal_entries_late_own_name;
ALTER TABLE journal_entries_late_0 REPLICA IDENTITY USING INDEX journal_entries_late_0_pkey;
COMMENT ON INDEX journal_entries_early_pkey IS 'early key';
"""


def test_a_sub_partitioned_primary_key_over_the_key_is_carried(legacy_db: str) -> None:
    """A primary key that holds the key column, over two levels of partitions: every
    level's constraint comes back under its own name (a middle level's too), with a
    leaf's replica identity and index comment; the table stays published and writable,
    the key unique; rollback puts the strings back exactly."""
    execute(legacy_db, KEYED_BY_USER)
    seeded(legacy_db, users=SEED_USERS)
    tree = execute(legacy_db, CONSTRAINT_TREE)
    assert ("journal_entries_late", "journal_entries_late_own_name", "p",
            "PRIMARY KEY (user_id, id, created_at)", "journal_entries_pkey", True, False,
            None, None) in tree
    identities = execute(legacy_db, IDENTITIES)
    original = print_of(legacy_db)
    run_ok(legacy_db, "full_migration", "--allow-publications")  # as in SUBPARTITIONED
    assert execute(legacy_db, CONSTRAINT_TREE) == tree
    assert execute(legacy_db, IDENTITIES) == identities
    run_ok(legacy_db, "validate_migration")
    execute(legacy_db, "UPDATE journal_entries SET title = title")  # published: identity
    with pytest.raises(psycopg2.errors.UniqueViolation):
        execute(legacy_db, "INSERT INTO journal_entries (id, user_id, title, created_at) "
                           "SELECT id, user_id, 'twin', created_at FROM journal_entries_late_1 "
                           "LIMIT 1")
    run_ok(legacy_db, "rollback", "--allow-publications")
    assert execute(legacy_db, CONSTRAINT_TREE) == tree
    assert_print(legacy_db, original)


def test_application_writes_to_partitions_are_logged_under_the_partitioned_table(
        clone: tuple[str, str]) -> None:
    """Writes after the backup into a partitioned table of the plan, row by row and by a
    TRUNCATE of one partition, are the application's: validation and verify pass, and the
    rollback keeps them.  Row triggers fire on the partition, so the log must file them
    under the table the plan names, and a partition's TRUNCATE fires only the partition's
    statement triggers."""
    dsn, _ = clone
    run_ok(dsn, "backup_data")
    user = str(execute(dsn, "SELECT min(id) FROM users")[0][0])
    execute(dsn, "INSERT INTO journal_entries (user_id, title, created_at) "
                 "VALUES (%s, 'written after the backup', '2024-01-05')", (user,))
    execute(dsn, "UPDATE journal_entries SET title = 'edited' WHERE created_at < '2024-01-03'")
    execute(dsn, "TRUNCATE journal_entries_mid")
    kept = print_of(dsn)
    run_ok(dsn, "migrate_users")
    run_ok(dsn, "migrate_foreign_keys")
    run_ok(dsn, "validate_migration")
    verified = CliRunner().invoke(verify.main, ["--database-url", dsn])
    assert verified.exit_code == 0, verified.output
    run_ok(dsn, "rollback")
    assert_print(dsn, kept)
    assert execute(dsn, "SELECT tgrelid::regclass::text, tgname FROM pg_trigger "
                        "WHERE tgname LIKE 'migration%%'") == []  # the partitions' too
