"""Tables without a primary key are carried: walked by a unique key or by pages.

``user_roles`` has no key at all (its fill walks ``ctid`` page ranges, its
rollback respells by content), ``user_devices`` only a unique index over a
NOT NULL column (walked by it).  Both reference ``users`` and hold
upper-case ids, so the rollback has spellings to give back.
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


def test_a_page_batch_is_a_tid_range_scan(no_pk_db: str) -> None:
    """The batch of a page walk reads only its pages (PostgreSQL 14+), wherever they are."""
    key = KeyColumn(ROLES, "user_id")
    run_ok(no_pk_db, "backup_data")
    execute(no_pk_db, "ALTER TABLE user_roles ADD COLUMN user_id_uuid uuid")
    statement = fill.batch_statement(key, fill.Walk(("ctid",)), first=False,
                                        bounded=True, backup_schema="migration_backup")
    with connected(no_pk_db) as conn, conn.cursor() as cur:
        cur.execute(b"EXPLAIN " + statement.as_string(conn).encode(),
                    {"n": 1, "after": Json(1), "upper": Json(3),
                     "slice": ("public", "user_roles", "user_id", 0)})
        plan = "\n".join(line for (line,) in cur.fetchall())
    assert "Tid Range Scan on user_roles x" in plan, plan
    # both ends of the range bound the scan, not a filter
    assert re.search(r"TID Cond: \(\(ctid >= .*\) AND \(ctid < .*\)\)", plan), plan


def test_tables_without_a_primary_key_migrate_validate_and_roll_back(
        no_pk_db: str) -> None:
    original, values = print_of(no_pk_db), expected_values(no_pk_db)
    checked = operate(no_pk_db, "validate_schema")
    assert checked.exit_code == 0, checked.output
    assert "the fill walks its pages" in checked.output
    migrated = run_ok(no_pk_db, "full_migration", *SMALL, "--jobs", "3")
    assert "missed by the batches" not in migrated.output  # the walks saw every row
    slices = execute(no_pk_db, "SELECT table_name, walk_key, count(*), bool_and(finished) "
                               "FROM migration_backup.backfill_progress "
                               "WHERE table_name IN ('user_roles', 'user_devices') "
                               "GROUP BY 1, 2 ORDER BY 1")
    assert slices == [("user_devices", ["device"], 3, True), ("user_roles", ["ctid"], 3, True)]
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
    """Killed at the second batch of user_roles (one page a batch), the first page is
    walked; VACUUM frees it (the fill moved its rows to new pages), and an update of
    an unfilled row on the next page moves it there, behind the checkpoint.  The sync
    trigger fills a row the application writes: the update is one it does not see (the
    engine's marker).  The resumed walk passes it by: the proof finds it, and it is
    filled, with a warning."""
    values = expected_values(no_pk_db)
    run_ok(no_pk_db, "backup_data")
    run_ok(no_pk_db, "migrate_users")
    with pytest.raises(psycopg2.OperationalError):
        run_in_process(no_pk_db, "migrate_foreign_keys", admin_dsn=admin_dsn(sandbox, no_pk_db),
                       settings=Settings(batch_size=7, jobs=1, show_progress=False),
                       crash_at="batch public.user_roles.user_id#2")
    [(walk, checkpoint)] = execute(no_pk_db, "SELECT walk_key, last_key::int FROM "
                                             "migration_backup.backfill_progress "
                                             "WHERE table_name = 'user_roles'")
    assert (walk, checkpoint) == (["ctid"], 1)
    execute(no_pk_db, "VACUUM user_roles")
    [(moved_to,)] = execute(no_pk_db, """
        SET uuid_migration.engine = 'on';
        UPDATE user_roles SET role = role WHERE ctid = (
            SELECT min(ctid) FROM user_roles WHERE user_id_uuid IS NULL
              AND ctid >= '(1,0)' AND ctid < '(2,0)')
        RETURNING (ctid::text::point)[0]::int""")
    assert moved_to < checkpoint  # behind the walk: only the proof can find it
    resumed = operate(no_pk_db, "migrate_foreign_keys", "--batch-size", "7", "--jobs", "1")
    assert resumed.exit_code == 0, resumed.output
    assert "public.user_roles.user_id: 1 rows were missed by the batches" in resumed.output
    run_ok(no_pk_db, "validate_migration")
    assert expected_values(no_pk_db) == values


def test_a_crash_in_a_unique_key_walk_resumes(no_pk_db: str, sandbox: Sandbox) -> None:
    original, values = print_of(no_pk_db), expected_values(no_pk_db)
    run_ok(no_pk_db, "backup_data")
    run_ok(no_pk_db, "migrate_users")
    with pytest.raises(psycopg2.OperationalError):
        run_in_process(no_pk_db, "migrate_foreign_keys", admin_dsn=admin_dsn(sandbox, no_pk_db),
                       settings=Settings(batch_size=7, jobs=1, show_progress=False),
                       crash_at="batch public.user_devices.user_id#2")
    saved = execute(no_pk_db, "SELECT walk_key, rows_done, last_key ->> 'device' FROM "
                              "migration_backup.backfill_progress "
                              "WHERE table_name = 'user_devices'")
    [(seventh,)] = execute(no_pk_db, "SELECT device FROM user_devices ORDER BY device "
                                     "OFFSET 6 LIMIT 1")
    assert saved == [(["device"], 7, seventh)]  # one batch of 7 committed, by device
    run_ok(no_pk_db, "migrate_foreign_keys", *SMALL)
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


def test_a_resumed_fill_walks_the_way_it_began(no_pk_db: str, sandbox: Sandbox) -> None:
    """user_devices gets a primary key while its fill is interrupted: the resumed fill
    still walks device from its checkpoint (the walk key recorded with the slice),
    and so misses no row."""
    run_ok(no_pk_db, "backup_data")
    run_ok(no_pk_db, "migrate_users")
    with pytest.raises(psycopg2.OperationalError):
        run_in_process(no_pk_db, "migrate_foreign_keys", admin_dsn=admin_dsn(sandbox, no_pk_db),
                       settings=Settings(batch_size=7, jobs=1, show_progress=False),
                       crash_at="batch public.user_devices.user_id#2")
    execute(no_pk_db, "ALTER TABLE user_devices ADD COLUMN n bigint "
                      "GENERATED ALWAYS AS IDENTITY PRIMARY KEY")
    resumed = run_ok(no_pk_db, "migrate_foreign_keys", *SMALL)
    assert "missed by the batches" not in resumed.output
    assert execute(no_pk_db, "SELECT walk_key, rows_done FROM migration_backup."
                             "backfill_progress WHERE table_name = 'user_devices'") \
        == execute(no_pk_db, "SELECT '{device}'::text[], count(*) FROM user_devices")
