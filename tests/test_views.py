"""Views over a key column, and views over those: carried through the swap both ways when
their definitions compile with the new type, with their options, owner, privileges and
comments, triggers and rules; refused up front and named, all at once, when they would not
or cannot be carried (materialized views, a view's column defaults, what depends on a
view)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg2.errors
import pytest
from psycopg2 import sql

from migration.engine import swap
from migration.rehearsal.sandbox import OWNER_ROLE, Sandbox
from migration.session import Settings
from tests.operate import (
    connected,
    execute,
    operate,
    print_of,
    refusal,
    run_in_process,
    run_ok,
    seeded,
)
from tests.scenario import Scenario

VIEWS = """
CREATE VIEW user_tags WITH (security_barrier) AS
    SELECT u.id, u.email, t.name FROM users u JOIN tags t ON t.user_id = u.id;
COMMENT ON VIEW user_tags IS 'tags by user';
COMMENT ON COLUMN user_tags.email IS 'the owner''s address';
GRANT SELECT ON user_tags TO PUBLIC;
CREATE VIEW user_tag_counts AS
    SELECT u.id, u.email, count(t.id) AS tags FROM users u LEFT JOIN tags t ON t.user_id = u.id
    GROUP BY u.id;
CREATE VIEW active_user_tags AS SELECT id, name FROM user_tags WHERE id IS NOT NULL;
CREATE VIEW own_reminders AS SELECT user_id, note, remind_at FROM reminders
    WHERE user_id IS NOT NULL
    WITH CASCADED CHECK OPTION;
"""
NAMES = ("active_user_tags", "own_reminders", "user_tag_counts", "user_tags")
SHAPE = """
SELECT c.relname, pg_get_viewdef(c.oid), c.reloptions, c.relacl::text,
       pg_get_userbyid(c.relowner), obj_description(c.oid, 'pg_class'),
       ARRAY(SELECT attname || ':' || coalesce(col_description(c.oid, attnum), '')
             FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0 ORDER BY attnum)
FROM pg_class c WHERE c.relkind = 'v' AND c.relnamespace = 'public'::regnamespace ORDER BY 1
"""
ROWS = {
    "user_tags": "SELECT id::text, email, name FROM user_tags ORDER BY 1, 3",
    "user_tag_counts": "SELECT id::text, tags FROM user_tag_counts ORDER BY 1",
    "active_user_tags": "SELECT id::text, name FROM active_user_tags ORDER BY 1, 2",
    "own_reminders": "SELECT user_id::text, note FROM own_reminders ORDER BY 1, 2",
}
TYPES = ("SELECT table_name, column_name, data_type FROM information_schema.columns "
         "WHERE table_name = ANY (%s) AND column_name IN ('id', 'user_id') ORDER BY 1, 2")


def test_views_over_the_keys_are_carried_both_ways_and_still_work(
        shaped: Callable[..., Scenario]) -> None:
    s = shaped(VIEWS)
    shape = execute(s.dsn, SHAPE)
    rows = {name: execute(s.dsn, query) for name, query in ROWS.items()}
    assert all(rows.values())
    assert [row[0] for row in shape] == list(NAMES)

    def after_swap(dsn: str) -> None:
        assert execute(dsn, TYPES, (list(NAMES),)) == [
            ("active_user_tags", "id", "uuid"), ("own_reminders", "user_id", "uuid"),
            ("user_tag_counts", "id", "uuid"), ("user_tags", "id", "uuid")]
        assert {name: execute(dsn, query) for name, query in ROWS.items()} == rows
        assert execute(dsn, SHAPE) == shape  # the server's text, casts included: the same
        user = execute(dsn, "SELECT id FROM users LIMIT 1")[0][0]
        with pytest.raises(psycopg2.errors.WithCheckOptionViolation):  # enforced, on uuid
            execute(dsn, "INSERT INTO own_reminders VALUES (NULL, 'x', now())")
        execute(dsn, "INSERT INTO own_reminders VALUES (%s, 'new', now())", (user,))
        execute(dsn, "DELETE FROM reminders WHERE note = 'new'")

    def after_rollback(dsn: str) -> None:
        assert execute(dsn, SHAPE) == shape
        assert {name: execute(dsn, query) for name, query in ROWS.items()} == rows

    s.round_trip(after_swap=after_swap, after_rollback=after_rollback)


def test_a_view_created_while_the_swap_reads_the_catalog_is_carried(
        legacy_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The swap reads the views over the columns before its write-blocking locks, under
    SHARE UPDATE EXCLUSIVE, which a CREATE VIEW (ACCESS SHARE on what it reads) does not
    wait for.  Under the locks it asks the views' signature again and, when a view came in
    between, reads them again: the new view is carried, not a reason for DROP COLUMN to
    fail."""
    seeded(legacy_db, users=5)
    execute(legacy_db, VIEWS)
    run_ok(legacy_db, "backup_data")
    run_ok(legacy_db, "migrate_users")
    read_views = swap.locked_check  # the last read before the write-blocking locks

    def view_comes_in(cur: Any, plan: Any) -> Any:
        if not execute(legacy_db, "SELECT to_regclass('late_user_tags')")[0][0]:
            execute(legacy_db, "CREATE VIEW late_user_tags AS SELECT id, name FROM user_tags")
        return read_views(cur, plan)

    monkeypatch.setattr(swap, "locked_check", view_comes_in)
    run_ok(legacy_db, "migrate_foreign_keys")
    assert execute(legacy_db, TYPES, (["late_user_tags"],)) == [("late_user_tags", "id", "uuid")]
    assert execute(legacy_db, "SELECT count(*) FROM late_user_tags") == execute(
        legacy_db, "SELECT count(*) FROM user_tags")


def test_a_changed_view_fails_verify(legacy_db: str) -> None:
    """Mutation: the views check sees a view whose definition or options changed."""
    seeded(legacy_db, VIEWS)
    run_ok(legacy_db, "full_migration")
    run_ok(legacy_db, "validate_migration")
    execute(legacy_db, "CREATE OR REPLACE VIEW active_user_tags AS SELECT id, name FROM user_tags")
    execute(legacy_db, "ALTER VIEW user_tags RESET (security_barrier)")
    result = operate(legacy_db, "validate_migration")
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "[FAIL] views public.active_user_tags: view changed since the backup" in text, text
    assert "[FAIL] views public.user_tags: view changed since the backup" in text, text
    assert "own_reminders: view" not in text


def test_a_view_that_no_longer_runs_fails_verify(legacy_db: str) -> None:
    seeded(legacy_db, "CREATE VIEW tag_owner AS SELECT user_id, "
                      "(SELECT 1 / count(*) FROM users u WHERE u.id = t.user_id) AS one "
                      "FROM tags t")
    run_ok(legacy_db, "full_migration")
    run_ok(legacy_db, "validate_migration")
    execute(legacy_db, "DELETE FROM tags WHERE user_id = (SELECT user_id FROM tags LIMIT 1)")
    execute(legacy_db, "ALTER TABLE tags DROP CONSTRAINT tags_user_id_fkey")
    execute(legacy_db, "INSERT INTO tags (user_id, name) VALUES (gen_random_uuid(), 'x')")
    execute(legacy_db, "DELETE FROM tags WHERE name <> 'x'")
    result = operate(legacy_db, "validate_migration")
    assert "[FAIL] views public.tag_owner: view changed since the backup" in " ".join(
        result.output.split()), result.output
    assert "a SELECT from it fails" in result.output


def test_views_that_cannot_be_carried_are_refused_at_once_by_name(legacy_db: str) -> None:
    seeded(legacy_db, VIEWS,
           "CREATE VIEW a_users AS SELECT coalesce(id, 'none') AS id, email FROM users",
           "CREATE VIEW a_user_emails AS SELECT email FROM a_users",
           "CREATE MATERIALIZED VIEW tag_counts AS SELECT user_id, count(*) FROM tags "
           "GROUP BY user_id",
           "CREATE RULE no_orphan_tags AS ON INSERT TO tags WHERE NEW.user_id IS NULL "
           "DO INSTEAD NOTHING",
           "CREATE FUNCTION tagged() RETURNS bigint LANGUAGE sql BEGIN ATOMIC "
           "SELECT count(*) FROM user_tags; END",
           "ALTER VIEW user_tag_counts ALTER COLUMN email SET DEFAULT 'nobody'")
    before = print_of(legacy_db, include_backup=True)
    views = execute(legacy_db, SHAPE)
    result = operate(legacy_db, "full_migration")
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    for line in (
            "[FAIL] blocker public.users.id: view public.a_users depends on the column and "
            "would not compile once the columns have their new types: COALESCE types uuid "
            "and character varying cannot be matched",
            "[FAIL] blocker public.users.id: view public.a_user_emails depends on the column "
            "and it reads view public.a_users, which would not compile",
            "[FAIL] blocker public.tags.user_id: materialized view public.tag_counts depends "
            "on the column",
            "[FAIL] blocker public.tags.user_id: rule no_orphan_tags on public.tags depends "
            "on the column",
            "[FAIL] blocker public.users.id: function public.tagged() depends on the column "
            "and it depends on view public.user_tags, which the swap drops and creates again",
            "[FAIL] blocker public.users.id: default value for column email of view "
            "public.user_tag_counts depends on the column and it depends on view "
            "public.user_tag_counts, which the swap drops and creates again"):
        assert line in text, text
    assert "pass --refresh-materialized-views to have the swap create it again empty" in text
    assert print_of(legacy_db, include_backup=True) == before
    assert execute(legacy_db, SHAPE) == views


def test_a_view_that_would_not_compile_back_refuses_the_rollback(legacy_db: str) -> None:
    """Made on uuid after the migration: on varchar, ``id = gen_random_uuid()`` has no
    operator.  The rollback names it before it changes anything."""
    seeded(legacy_db, VIEWS)
    run_ok(legacy_db, "full_migration")
    execute(legacy_db, "CREATE VIEW new_users AS SELECT email FROM user_tags "
                       "WHERE id <> gen_random_uuid()")
    before = print_of(legacy_db, include_backup=True)
    result = operate(legacy_db, "rollback")
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert ("refused, nothing was changed: view public.new_users (would not compile once the "
            "columns have their new types: operator does not exist: character varying <> "
            "uuid)") in text, text
    assert print_of(legacy_db, include_backup=True) == before
    execute(legacy_db, "DROP VIEW new_users")
    run_ok(legacy_db, "rollback")


UPDATABLE = """
CREATE VIEW mailing AS SELECT email FROM users;
CREATE RULE mailing_delete AS ON DELETE TO mailing DO INSTEAD
    DELETE FROM reminders r USING users u WHERE r.user_id = u.id AND u.email = OLD.email;
COMMENT ON RULE mailing_delete ON mailing IS 'forget the reminders';
CREATE VIEW user_emails AS SELECT id, email FROM users;
CREATE FUNCTION user_emails_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO users (id, email) VALUES (NEW.id, NEW.email);
    RETURN NEW;
END $$;
CREATE TRIGGER user_emails_insert INSTEAD OF INSERT ON user_emails
    FOR EACH ROW EXECUTE FUNCTION user_emails_insert();
COMMENT ON TRIGGER user_emails_insert ON user_emails IS 'sign up';
"""
VIEW_OBJECTS = """
SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid), obj_description(t.oid, 'pg_trigger')
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
WHERE c.relkind = 'v' AND c.relnamespace = 'public'::regnamespace
UNION ALL
SELECT c.relname, r.rulename, pg_get_ruledef(r.oid), obj_description(r.oid, 'pg_rewrite')
FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
WHERE c.relkind = 'v' AND c.relnamespace = 'public'::regnamespace AND r.rulename <> '_RETURN'
ORDER BY 1, 2
"""


def test_triggers_and_rules_on_views_are_carried_both_ways(legacy_db: str) -> None:
    """An INSTEAD OF trigger and a rule on views over the keys: the trigger's body names
    the key, so it is refused until --allow-triggers accepts it; a view whose query does
    not read the key but whose rule does is carried too.  Both work on uuid, verify sees
    one go missing, and the rollback puts them back."""
    seeded(legacy_db, UPDATABLE)
    objects = execute(legacy_db, VIEW_OBJECTS)
    assert [row[1] for row in objects] == ["mailing_delete", "user_emails_insert"]
    text = refusal(legacy_db)
    assert "trigger user_emails_insert on view public.user_emails names id in its " \
        "function's body" in text, text

    run_ok(legacy_db, "full_migration", "--allow-triggers")
    assert execute(legacy_db, VIEW_OBJECTS) == objects
    new_user = "00000000-0000-4000-8000-00000000abcd"
    execute(legacy_db, "INSERT INTO user_emails VALUES (%s, 'view@example.com')", (new_user,))
    assert execute(legacy_db, "SELECT id::text FROM users WHERE email = 'view@example.com'") \
        == [(new_user,)]
    email, reminders = execute(legacy_db, "SELECT u.email, count(*) FROM reminders r "
                                          "JOIN users u ON u.id = r.user_id "
                                          "GROUP BY 1 ORDER BY 2 DESC LIMIT 1")[0]
    assert reminders
    execute(legacy_db, "DELETE FROM mailing WHERE email = %s", (email,))
    assert execute(legacy_db, "SELECT count(*) FROM reminders r JOIN users u "
                              "ON u.id = r.user_id WHERE u.email = %s", (email,)) == [(0,)]
    run_ok(legacy_db, "validate_migration")
    execute(legacy_db, "DROP TRIGGER user_emails_insert ON user_emails")  # mutation
    result = operate(legacy_db, "validate_migration")
    assert "[FAIL] views public.user_emails: view changed since the backup" in " ".join(
        result.output.split()), result.output
    execute(legacy_db, "CREATE TRIGGER user_emails_insert INSTEAD OF INSERT ON user_emails "
                       "FOR EACH ROW EXECUTE FUNCTION user_emails_insert();"
                       "COMMENT ON TRIGGER user_emails_insert ON user_emails IS 'sign up'")
    run_ok(legacy_db, "rollback", "--allow-triggers")
    assert execute(legacy_db, VIEW_OBJECTS) == objects


def test_a_rule_on_a_view_that_would_not_compile_is_refused(legacy_db: str) -> None:
    """The rule writes text into the key: on uuid it would not compile, and it is named
    before anything changes."""
    seeded(legacy_db, "CREATE VIEW signup AS SELECT email FROM users",
           "CREATE RULE signup_insert AS ON INSERT TO signup DO INSTEAD "
           "INSERT INTO users (id, email) VALUES (md5(NEW.email), NEW.email)")
    text = refusal(legacy_db)
    assert "[FAIL] blocker public.users.id: view public.signup depends on the column and its " \
        "rule signup_insert would not compile once the columns have their new types" in text, text


def test_views_are_refused_by_name_when_this_role_may_not_create_temporary_tables(
        sandbox: Sandbox, legacy_db: str) -> None:
    """The views' check needs temporary tables: without the privilege every view is named
    as one that cannot be judged, with the grant that helps, and nothing changes.  Before
    PostgreSQL 16 the pre-flight's uuid test is a temporary function: it stops at once,
    saying so, and nothing changes either."""
    seeded(legacy_db, VIEWS)
    with connected(legacy_db) as conn:
        name, version = conn.info.dbname, conn.server_version
    execute(sandbox.admin_dsn_for(name), sql.SQL(
        "ALTER DATABASE {db} OWNER TO CURRENT_USER; REVOKE TEMPORARY ON DATABASE {db} "
        "FROM PUBLIC; GRANT CONNECT ON DATABASE {db} TO PUBLIC; "
        "GRANT CREATE ON SCHEMA public TO {owner}").format(  # PostgreSQL 15+: the db owner's
        db=sql.Identifier(name), owner=sql.Identifier(OWNER_ROLE)))
    text = refusal(legacy_db, "validate_schema")
    if version < 160000:
        assert "permission denied to create temporary tables" in text, text
    for view in NAMES if version >= 160000 else ():
        assert f"view public.{view} depends on the column and cannot be judged: this role may " \
            "not create temporary tables" in text, text


MATERIALIZED = """
CREATE MATERIALIZED VIEW tag_counts WITH (fillfactor = 90) AS
    SELECT t.user_id, count(*) AS tags FROM tags t GROUP BY t.user_id;
CREATE UNIQUE INDEX tag_counts_user ON tag_counts (user_id);
COMMENT ON INDEX tag_counts_user IS 'one row a user';
COMMENT ON MATERIALIZED VIEW tag_counts IS 'tags by user';
GRANT SELECT ON tag_counts TO PUBLIC;
CREATE VIEW busy_users AS SELECT user_id FROM tag_counts WHERE tags > 1;
CREATE MATERIALIZED VIEW never_filled AS SELECT id FROM users WITH NO DATA;
"""
MATERIALIZED_SHAPE = """
SELECT c.relname, c.relkind::text, pg_get_viewdef(c.oid), c.reloptions, c.relacl::text,
       obj_description(c.oid, 'pg_class'), c.relispopulated,
       ARRAY(SELECT pg_get_indexdef(i.indexrelid) || ' ' || coalesce(obj_description(
             i.indexrelid, 'pg_class'), '') FROM pg_index i WHERE i.indrelid = c.oid)
FROM pg_class c WHERE c.relkind IN ('v', 'm') AND c.relnamespace = 'public'::regnamespace
ORDER BY 1
"""
COUNTS = "SELECT user_id::text, tags FROM tag_counts ORDER BY 1"


def test_materialized_views_are_carried_when_their_refresh_is_accepted(
        shaped: Callable[..., Scenario]) -> None:
    """Refused by default, named; with --refresh-materialized-views created again empty in
    the swap, with their options, indexes, grants and comments, and refreshed right after
    (one never filled stays so); the same rows, both ways; verify sees one left empty."""
    s = shaped(MATERIALIZED)
    shape, counts = execute(s.dsn, MATERIALIZED_SHAPE), execute(s.dsn, COUNTS)
    assert counts
    text = refusal(s.dsn)
    for name in ("tag_counts", "never_filled"):
        assert f"materialized view public.{name} depends on the column" in text, text
    assert "--refresh-materialized-views" in text

    def after_swap(dsn: str) -> None:
        assert execute(dsn, MATERIALIZED_SHAPE) == shape
        assert execute(dsn, COUNTS) == counts
        assert execute(dsn, "SELECT attrelid::regclass::text, format_type(atttypid, NULL) "
                            "FROM pg_attribute WHERE attname = 'user_id' AND attrelid IN "
                            "('tag_counts'::regclass, 'busy_users'::regclass) ORDER BY 1") \
            == [("busy_users", "uuid"), ("tag_counts", "uuid")]
        execute(dsn, "REFRESH MATERIALIZED VIEW tag_counts WITH NO DATA")  # mutation
        result = operate(dsn, "validate_migration")
        assert "[FAIL] views public.tag_counts: view changed since the backup" in " ".join(
            result.output.split()), result.output
        execute(dsn, "REFRESH MATERIALIZED VIEW tag_counts")

    def after_rollback(dsn: str) -> None:
        assert execute(dsn, MATERIALIZED_SHAPE) == shape
        assert execute(dsn, COUNTS) == counts

    s.round_trip(after_swap=after_swap, after_rollback=after_rollback,
                 options=("--refresh-materialized-views",))


def test_a_refresh_cut_short_after_the_swap_is_resumed(sandbox: Sandbox, legacy_db: str) -> None:
    """The swap commits the record of the views it left empty: killed before a refresh
    commits, the migration says where it stands, and its rerun refreshes them."""
    seeded(legacy_db, MATERIALIZED)
    counts = execute(legacy_db, COUNTS)
    with connected(legacy_db) as conn:
        admin_dsn = sandbox.admin_dsn_for(conn.info.dbname)
    settings = Settings(show_progress=False, refresh_materialized_views=True)
    reached: list[str] = []
    with pytest.raises(psycopg2.OperationalError):
        run_in_process(legacy_db, "full_migration", admin_dsn=admin_dsn, settings=settings,
                       crash_at="refresh public.tag_counts#1", reached=reached)
    assert "refresh public.tag_counts#1" in reached
    assert execute(legacy_db, "SELECT relispopulated FROM pg_class "
                              "WHERE oid = 'tag_counts'::regclass") == [(False,)]
    assert "materialized view(s) left empty by the swap until they are refreshed: " \
        "public.tag_counts" in run_ok(legacy_db, "status").output
    result = run_ok(legacy_db, "migrate_foreign_keys", "--refresh-materialized-views")
    assert "1 materialized view(s) refreshed" in result.output, result.output
    assert execute(legacy_db, COUNTS) == counts
    run_ok(legacy_db, "validate_migration")
