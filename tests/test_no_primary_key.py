"""Tables without a primary key are carried, their rows named by a unique key or their place.

Every plain table's fill walks its pages; ``user_roles`` has no key at all (the
pre-flight names its rows by ``ctid``, its rollback respells by content),
``user_devices`` only a unique index over a NOT NULL column (its rows named by
it).  Both reference ``users`` and hold upper-case ids, so the rollback has
spellings to give back.  The page walk's own batches are pinned here too.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

import psycopg2
import pytest
from psycopg2.extras import Json

from migration import catalog
from migration.engine import fill
from migration.model import KeyColumn, Table
from migration.rehearsal.sandbox import Sandbox
from migration.session import Settings
from tests.operate import connected, execute, operate, print_of, run_in_process, run_ok

SMALL = ("--batch-size", "7")
ROLES = Table("public", "user_roles")
DEVICES = Table("public", "user_devices")

def admin_dsn(sandbox: Sandbox, dsn: str) -> str:
    return sandbox.admin_dsn_for(urlsplit(dsn).path.lstrip("/"))


def expected_values(dsn: str) -> dict[Table, list[tuple[object, ...]]]:
    """Each table's rows with user_id cast to uuid, as a sorted multiset."""
    return {ROLES: sorted(execute(dsn, "SELECT user_id::uuid::text, role FROM user_roles"),
                          key=str),
            DEVICES: sorted(execute(dsn, "SELECT user_id::uuid::text, device "
                                         "FROM user_devices"), key=str)}


def test_the_walk_key_is_the_primary_key_else_the_smallest_plain_unique_key_else_pages(
        no_pk_db: str) -> None:
    execute(no_pk_db, """
        CREATE TABLE keyed (a int NOT NULL, b int NOT NULL, c int, d int NOT NULL,
                            e text NOT NULL, f int NOT NULL, UNIQUE (a, b), UNIQUE (c));
        CREATE UNIQUE INDEX keyed_d ON keyed (d) WHERE d > 0;
        CREATE UNIQUE INDEX keyed_e ON keyed (lower(e));
        CREATE TABLE unkeyed (a int NOT NULL, c int UNIQUE)""")
    with connected(no_pk_db) as conn:
        walks = {name: catalog.walk_key(conn, Table("public", name))
                 for name in ("users", "user_devices", "user_roles", "keyed", "unkeyed")}
        execute(no_pk_db, "ALTER TABLE keyed ADD UNIQUE (f)")
        walks["keyed, then f"] = catalog.walk_key(conn, Table("public", "keyed"))
    assert walks == {"users": ["id"], "user_devices": ["device"], "user_roles": ["ctid"],
                     "keyed": ["a", "b"], "unkeyed": ["ctid"], "keyed, then f": ["f"]}


@pytest.mark.parametrize("after", [1, {"page": 1, "offset": 3, "half": 1, "last": 9}],
                         ids=["a block's first batch", "a later pass"])
def test_a_page_batch_is_a_tid_range_scan(no_pk_db: str, after: object) -> None:
    """The batch of a page walk reads only its pages (PostgreSQL 14+), wherever they are:
    its update, and at a block's first batch the read of the block's line pointers."""
    key = KeyColumn(ROLES, "user_id")
    run_ok(no_pk_db, "backup_data")
    execute(no_pk_db, "ALTER TABLE user_roles ADD COLUMN user_id_uuid uuid")
    statement = fill.batch_statement(key, fill.Walk(("ctid",)), first=False,
                                     bounded=True, backup_schema="migration_backup")
    with connected(no_pk_db) as conn, conn.cursor() as cur:
        cur.execute(b"EXPLAIN " + statement.as_string(conn).encode(),
                    {"n": 1, "passes": 16, "after": Json(after), "upper": Json(3),
                     "slice": ("public", "user_roles", "user_id", 0)})
        plan = "\n".join(line for (line,) in cur.fetchall())
    assert "Seq Scan" not in plan, plan
    assert "Tid Range Scan on user_roles x" in plan, plan
    # a block's first batch reads its highest line pointer; a later one knows it
    assert ("Tid Range Scan on user_roles y" in plan) == isinstance(after, int), plan
    # both ends of the range bound the scan, not a filter
    assert re.search(r"TID Cond: \(\(ctid >= .*\) AND \(ctid < .*\)\)", plan), plan


def test_a_page_walk_takes_a_few_line_pointers_of_each_page_a_batch_and_every_row_once(
        no_pk_db: str) -> None:
    """Five full pages, two pages a half-block, eight passes a block: with ``m`` the
    block's highest line pointer number over eight, the batches take numbers 1 to m of
    pages 0-1, then of pages 2-3, then the next m of each, up to the block's highest,
    then the next block (page 4, no second half), then an empty batch that ends the
    slice.  Resumed with three pages a half-block after its first batch, the walk keeps
    two for the block it is in (its checkpoint says so) and takes three from the next.
    Each row is updated once: the moves the updates make, to new pages past the walk's
    end or to numbers past the block's highest, are not walked again."""
    run_ok(no_pk_db, "backup_data")
    execute(no_pk_db, "CREATE TABLE walked (user_id varchar(36) NOT NULL, pad char(300) "
                      "NOT NULL DEFAULT '', user_id_uuid uuid)")
    fill_page = "INSERT INTO walked (user_id) SELECT gen_random_uuid() FROM generate_series(1, %s)"
    execute(no_pk_db, fill_page, (100,))
    [(per_page,)] = execute(no_pk_db, "SELECT count(*) FROM walked WHERE ctid < '(1,0)'")
    execute(no_pk_db, "TRUNCATE walked")
    execute(no_pk_db, fill_page, (5 * per_page,))
    assert execute(no_pk_db, "SELECT count(DISTINCT (ctid::text::point)[0]) FROM walked") \
        == [(5,)]
    statement = fill.batch_statement(KeyColumn(Table("public", "walked"), "user_id"),
                                     fill.Walk((catalog.PAGES,)), first=False, bounded=True,
                                     backup_schema="migration_backup")
    walked: list[tuple[object, int]] = []
    after: object = 0
    with connected(no_pk_db, autocommit=False) as conn:
        while after is not None:
            with conn.cursor() as cur:
                cur.execute(statement, {"n": 3 if walked else 2, "passes": 8, "after": Json(after),
                                        "upper": Json(5), "slice": ("public", "walked",
                                                                    "user_id", 0)})
                count, checkpoint = cur.fetchone()
            conn.commit()
            walked.append((after, count))
            after = checkpoint

    numbers = -(-per_page // 8)  # m
    expected: list[tuple[object, int]] = []
    for block, halves in ((0, 2), (4, 1)):
        for first in range(1, per_page + 1, numbers):
            taken = len(range(first, min(first + numbers, per_page + 1)))
            for half in range(halves):
                position = block if (first, half) == (1, 0) else {
                    "page": block, "offset": first, "half": half, "last": per_page,
                    "pages": 2 if block == 0 else 3}
                expected.append((position, 2 * taken if halves == 2 else taken))
    expected.append((4 + 2 * 3, 0))
    assert walked == expected
    assert execute(no_pk_db, "SELECT count(*), count(*) FILTER (WHERE user_id_uuid = "
                             "user_id::uuid) FROM walked") == [(5 * per_page, 5 * per_page)]


def test_tables_without_a_primary_key_migrate_validate_and_roll_back(
        no_pk_db: str) -> None:
    original, values = print_of(no_pk_db), expected_values(no_pk_db)
    checked = operate(no_pk_db, "validate_schema")
    assert checked.exit_code == 0, checked.output
    assert "its rows are named by their place (ctid)" in checked.output
    migrated = run_ok(no_pk_db, "full_migration", *SMALL, "--jobs", "3")
    assert "missed by the batches" not in migrated.output  # the walks saw every row
    slices = execute(no_pk_db, "SELECT table_name, walk_key, count(*), bool_and(finished) "
                               "FROM migration_backup.backfill_progress "
                               "WHERE table_name IN ('user_roles', 'user_devices') "
                               "GROUP BY 1, 2 ORDER BY 1")
    assert slices == [("user_devices", ["ctid"], 1, True), ("user_roles", ["ctid"], 3, True)]
    run_ok(no_pk_db, "validate_migration")
    assert execute(no_pk_db, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                             "WHERE attrelid IN ('user_roles'::regclass, "
                             "'user_devices'::regclass) AND attname = 'user_id'") \
        == [("uuid",), ("uuid",)]
    assert expected_values(no_pk_db) == values
    run_ok(no_pk_db, "rollback", *SMALL)
    after = print_of(no_pk_db)
    assert after == original, "\n".join(original.diff(after))


def test_a_crash_in_a_page_walk_resumes_and_the_proof_fills_a_row_moved_behind_it(
        no_pk_db: str, sandbox: Sandbox) -> None:
    """Killed at the second batch of user_roles (a page a batch, a few line pointer
    numbers a pass), the first page's first numbers are walked; VACUUM frees the places
    their rows left, and an update of an unfilled row further on that page moves it to
    one of them, behind the checkpoint.  The sync trigger fills a row the application
    writes: the update is one it does not see (the engine's marker).  The resumed walk
    passes it by: the proof finds it, and it is filled, with a warning."""
    values = expected_values(no_pk_db)
    run_ok(no_pk_db, "backup_data")
    run_ok(no_pk_db, "migrate_users")
    with pytest.raises(psycopg2.OperationalError):
        run_in_process(no_pk_db, "migrate_foreign_keys", admin_dsn=admin_dsn(sandbox, no_pk_db),
                       settings=Settings(batch_size=7, jobs=1, show_progress=False),
                       crash_at="batch public.user_roles.user_id#2")
    [(walk, checkpoint)] = execute(no_pk_db, "SELECT walk_key, last_key FROM "
                                             "migration_backup.backfill_progress "
                                             "WHERE table_name = 'user_roles'")
    assert walk == ["ctid"]
    assert {k: checkpoint[k] for k in ("page", "offset", "half")} == {
        "page": 0, "offset": 1, "half": 1}  # next: the block's second page
    # the walk takes a page's numbers in order: the unfilled rows' numbers are ahead
    [(ahead,)] = execute(no_pk_db, "SELECT min((ctid::text::point)[1])::int FROM user_roles "
                                   "WHERE ctid < '(1,0)' AND user_id_uuid IS NULL")
    execute(no_pk_db, "VACUUM user_roles")
    [(page, line_pointer)] = execute(no_pk_db, """
        SET uuid_migration.engine = 'on';
        UPDATE user_roles SET role = role WHERE ctid = (
            SELECT max(ctid) FROM user_roles WHERE user_id_uuid IS NULL AND ctid < '(1,0)')
        RETURNING (ctid::text::point)[0]::int, (ctid::text::point)[1]::int""")
    assert (page, line_pointer < ahead) == (0, True)  # behind the walk: only the proof finds it
    resumed = operate(no_pk_db, "migrate_foreign_keys", "--batch-size", "7", "--jobs", "1")
    assert resumed.exit_code == 0, resumed.output
    assert "public.user_roles.user_id: 1 rows were missed by the batches" in resumed.output
    run_ok(no_pk_db, "validate_migration")
    assert expected_values(no_pk_db) == values


def test_a_slice_an_earlier_version_walked_by_a_unique_key_resumes_by_it(
        no_pk_db: str, sandbox: Sandbox) -> None:
    """An earlier version walked a table with a unique key by that key.  Its slice,
    recorded so (the walk key with the slice) and interrupted, is resumed by this
    version by the same key from its checkpoint, and so misses no row."""
    original, values = print_of(no_pk_db), expected_values(no_pk_db)
    run_ok(no_pk_db, "backup_data")
    run_ok(no_pk_db, "migrate_users")
    one_by_one = Settings(batch_size=7, jobs=1, show_progress=False)
    with pytest.raises(psycopg2.OperationalError):  # the copy added, no batch yet
        run_in_process(no_pk_db, "migrate_foreign_keys", admin_dsn=admin_dsn(sandbox, no_pk_db),
                       settings=one_by_one, crash_at="batch public.user_devices.user_id#1")
    execute(no_pk_db, "UPDATE migration_backup.backfill_progress SET walk_key = '{device}', "
                      "last_key = NULL, upper_key = NULL WHERE table_name = 'user_devices'")
    with pytest.raises(psycopg2.OperationalError):
        run_in_process(no_pk_db, "migrate_foreign_keys", admin_dsn=admin_dsn(sandbox, no_pk_db),
                       settings=one_by_one, crash_at="batch public.user_devices.user_id#2")
    saved = execute(no_pk_db, "SELECT walk_key, rows_done, last_key ->> 'device' FROM "
                              "migration_backup.backfill_progress "
                              "WHERE table_name = 'user_devices'")
    # one batch of 7 committed, by device; its rows without a user have their copy
    first = "(SELECT * FROM user_devices ORDER BY device LIMIT 7) d"
    [(seventh, keyed)] = execute(no_pk_db, f"SELECT max(device), count(user_id) FROM {first}")
    assert saved == [(["device"], keyed, seventh)]
    resumed = run_ok(no_pk_db, "migrate_foreign_keys", *SMALL)
    assert "missed by the batches" not in resumed.output
    assert execute(no_pk_db, "SELECT walk_key, rows_done FROM migration_backup."
                             "backfill_progress WHERE table_name = 'user_devices'") \
        == execute(no_pk_db, "SELECT '{device}'::text[], count(user_id) FROM user_devices")
    run_ok(no_pk_db, "validate_migration")
    assert expected_values(no_pk_db) == values
    run_ok(no_pk_db, "rollback", *SMALL)
    after = print_of(no_pk_db)
    assert after == original, "\n".join(original.diff(after))


def test_the_pre_flight_names_bad_rows_by_walk_key_or_ctid(no_pk_db: str) -> None:
    """An id PostgreSQL does not take for a uuid, in both tables: the findings' samples
    name the user_devices row by its device, the user_roles row by its ctid."""
    execute(no_pk_db, "INSERT INTO users (id, email) VALUES ('not-a-uuid', 'bad@example.com');"
                      "INSERT INTO user_roles VALUES ('not-a-uuid', 'reader');"
                      "INSERT INTO user_devices VALUES ('not-a-uuid', 'bad-device')")
    [(where,)] = execute(no_pk_db, "SELECT ctid::text FROM user_roles "
                                   "WHERE user_id = 'not-a-uuid'")
    checked = operate(no_pk_db, "validate_schema", "--format", "json")
    assert checked.exit_code != 0
    samples = {finding["subject"]: finding["samples"]
               for finding in json.loads(checked.output)["findings"]
               if finding["check"] == "invalid_uuid"}
    assert samples["public.user_roles.user_id"] == [
        {"table": "public.user_roles", "ctid": where, "user_id": "not-a-uuid"}]
    assert samples["public.user_devices.user_id"] == [
        {"table": "public.user_devices", "device": "bad-device", "user_id": "not-a-uuid"}]


def test_rollback_keeps_the_application_s_rows_in_a_table_without_a_key(
        no_pk_db: str) -> None:
    """After the migration the application deletes one of two identical rows and adds a
    row: the rollback counts both as changes (duplicates are counted, not merged),
    the copy left gets back its upper-case spelling, the new row keeps its text."""
    run_ok(no_pk_db, "full_migration", *SMALL)
    [(doubled,)] = execute(no_pk_db, "DELETE FROM user_roles WHERE ctid = (SELECT min(ctid) "
                                     "FROM user_roles WHERE role = 'reader' AND user_id IN ("
                                     "SELECT user_id FROM user_roles GROUP BY user_id, role "
                                     "HAVING count(*) = 2)) RETURNING user_id::text")
    [(single,)] = execute(no_pk_db, "SELECT min(id::text) FROM users WHERE email LIKE 'user%%'")
    execute(no_pk_db, "INSERT INTO user_roles (user_id, role) VALUES (%s, 'guest')", (single,))
    rolled = run_ok(no_pk_db, "rollback", *SMALL)
    assert "2 row(s) the application changed since the backup were kept" in rolled.output
    assert execute(no_pk_db, "SELECT user_id FROM user_roles WHERE role = 'reader' "
                             "AND lower(user_id) = %s", (doubled,)) == [(str(doubled).upper(),)]
    assert execute(no_pk_db, "SELECT user_id FROM user_roles WHERE role = 'guest'") \
        == [(single,)]


def test_rows_equal_but_for_spelling_get_back_one_spelling_each(no_pk_db: str) -> None:
    """A key-less table whose foreign key was added NOT VALID over rows that spell an
    upper-case user in lower case too: in uuid the two rows of each pair are equal,
    and the rollback gives one of them each spelling again, not both the same."""
    execute(no_pk_db, """
        CREATE TABLE user_badges (user_id varchar(36) NOT NULL, badge text NOT NULL);
        INSERT INTO user_badges SELECT s, 'gold' FROM users u,
            LATERAL (VALUES (u.id), (lower(u.id))) v (s) WHERE u.id <> lower(u.id);
        ALTER TABLE user_badges ADD FOREIGN KEY (user_id) REFERENCES users (id) NOT VALID""")
    original = print_of(no_pk_db)
    run_ok(no_pk_db, "full_migration", *SMALL)
    assert execute(no_pk_db, "SELECT count(DISTINCT user_id), count(*) FROM user_badges") \
        == [(20, 40)]
    run_ok(no_pk_db, "rollback", *SMALL)
    after = print_of(no_pk_db)
    assert after == original, "\n".join(original.diff(after))
