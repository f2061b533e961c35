"""Objects that depend on a key column: carried through the migration and the rollback
when their definitions compile with the uuid type (RLS policies, CHECK constraints,
expression indexes), refused up front and named, all at once, when they would not."""

from __future__ import annotations

from collections.abc import Callable

import psycopg2.errors
import pytest
from psycopg2 import sql

from migration.rehearsal.sandbox import OWNER_ROLE, Sandbox
from tests.operate import connected, execute, operate, print_of, refusal, run_ok, seeded
from tests.scenario import Scenario

POLICY = """
ALTER TABLE tags ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_tags ON tags USING (user_id = current_setting('app.user_id', true));
CREATE POLICY active_users ON tags AS RESTRICTIVE USING (EXISTS (
    SELECT 1 FROM users WHERE users.id = tags.user_id AND users.is_active));
COMMENT ON POLICY own_tags ON tags IS 'a user sees their own tags';
"""
POLICIES = ("SELECT policyname, permissive, roles::text, cmd, qual, with_check "
            "FROM pg_policies WHERE tablename = 'tags' ORDER BY 1")
POLICY_COMMENT = ("SELECT obj_description(oid, 'pg_policy') FROM pg_policy "
                  "WHERE polname = 'own_tags'")
LOWER_INDEX = "CREATE INDEX journal_entries_lower_user ON journal_entries (lower(user_id))"
REMINDER_CHECK = ("ALTER TABLE reminders ADD CONSTRAINT reminders_user_or_no_time "
                  "CHECK (user_id IS NOT NULL OR remind_at IS NULL)")


def visible_tags(dsn: str, user_id: str) -> list[tuple[object, ...]]:
    """The tags the policies let the owner see when it is subject to them (FORCE)."""
    with connected(dsn, autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE tags FORCE ROW LEVEL SECURITY")
        cur.execute("SELECT set_config('app.user_id', %s, true)", (user_id,))
        cur.execute("SELECT DISTINCT user_id::text FROM tags")
        rows = cur.fetchall()
        conn.rollback()
    return rows


def test_policies_using_the_keys_are_carried_and_still_enforced(
        shaped: Callable[..., Scenario]) -> None:
    s = shaped(POLICY)
    policies = execute(s.dsn, POLICIES)
    user = str(execute(s.dsn, "SELECT user_id FROM tags LIMIT 1")[0][0])
    assert visible_tags(s.dsn, user) == [(user,)]

    def after_swap(dsn: str) -> None:
        assert execute(dsn, "SELECT data_type FROM information_schema.columns WHERE "
                            "table_name = 'tags' AND column_name = 'user_id'") == [("uuid",)]
        assert execute(dsn, POLICIES) == policies
        assert execute(dsn, POLICY_COMMENT) == [("a user sees their own tags",)]
        assert execute(dsn, "SELECT relrowsecurity FROM pg_class "
                            "WHERE relname = 'tags'") == [(True,)]
        assert visible_tags(dsn, user) == [(user,)]
        execute(dsn, "UPDATE users SET is_active = false WHERE id = %s::uuid", (user,))
        assert visible_tags(dsn, user) == []  # the restrictive policy, through users.id
        execute(dsn, "UPDATE users SET is_active = true WHERE id = %s::uuid", (user,))

    def after_rollback(dsn: str) -> None:
        assert execute(dsn, POLICIES) == policies
        assert execute(dsn, POLICY_COMMENT) == [("a user sees their own tags",)]
        assert visible_tags(dsn, user) == [(user,)]

    s.round_trip(after_swap=after_swap, after_rollback=after_rollback)


def test_an_expression_index_on_the_key_is_carried_under_its_name_and_used(
        shaped: Callable[..., Scenario]) -> None:
    s = shaped(LOWER_INDEX)
    definition = execute(s.dsn, "SELECT pg_get_indexdef('journal_entries_lower_user'"
                                "::regclass)")

    def after_swap(dsn: str) -> None:
        assert execute(dsn, "SELECT pg_get_indexdef('journal_entries_lower_user'"
                            "::regclass)") == definition
        user = str(execute(dsn, "SELECT user_id FROM journal_entries LIMIT 1")[0][0])
        with connected(dsn) as conn, conn.cursor() as cur:
            cur.execute("SET enable_seqscan = off")
            cur.execute("EXPLAIN SELECT * FROM journal_entries WHERE lower(user_id::text) = %s",
                        (user,))
            plan = "\n".join(row[0] for row in cur.fetchall())
        assert "journal_entries_lower_user" in plan, plan

    s.round_trip(after_swap=after_swap)


def test_a_check_on_the_key_is_carried_validated_and_enforced(
        shaped: Callable[..., Scenario]) -> None:
    """Enforced throughout: on the string column while its copy is filled and proven (the
    engine's copy of the check beside it), on the uuid one after the swap."""
    s = shaped(REMINDER_CHECK)

    def refused(dsn: str) -> None:
        with pytest.raises(psycopg2.errors.CheckViolation):
            execute(dsn, "INSERT INTO reminders (id, user_id, remind_at) "
                         "VALUES (gen_random_uuid()::text, NULL, now())")

    def after_swap(dsn: str) -> None:
        assert execute(dsn, "SELECT pg_get_constraintdef(oid), convalidated FROM "
                            "pg_constraint WHERE conname = 'reminders_user_or_no_time'") == [
            ("CHECK (((user_id IS NOT NULL) OR (remind_at IS NULL)))", True)]
        assert execute(dsn, "SELECT count(*) FROM pg_constraint "
                            "WHERE conname ~ '^migration_ck_'") == [(0,)]
        refused(dsn)

    s.round_trip(after_expand=refused, after_swap=after_swap)


def test_what_does_not_compile_as_uuid_is_refused_at_once_with_a_hint(legacy_db: str) -> None:
    """Each kind the oracle judges, and one that stays refused whatever it says."""
    seeded(legacy_db, POLICY, LOWER_INDEX, REMINDER_CHECK,
           "ALTER TABLE users ADD CONSTRAINT users_id_given CHECK (coalesce(id, '') <> '')",
           "CREATE POLICY active_only ON tags USING "
           "(user_id IN (SELECT id FROM users WHERE is_active))",
           "CREATE INDEX tags_user_or_none ON tags (coalesce(user_id, 'none'))",
           "CREATE MATERIALIZED VIEW active_tags AS SELECT user_id, name FROM tags")
    before = print_of(legacy_db, include_backup=True)
    result = operate(legacy_db, "full_migration")
    assert result.exit_code == 1, result.output
    for line in (
            "[FAIL] blocker public.users.id: constraint users_id_given (CHECK "
            "((COALESCE(id, ''::character varying))::text <> ''::text)) depends on the column "
            "and would not compile once id is uuid: COALESCE types uuid and character "
            "varying cannot be matched",
            "[FAIL] blocker public.users.id: policy active_only on public.tags depends on the "
            "column and would not compile once id is uuid: operator does not exist: "
            "text = uuid",
            "[FAIL] blocker public.tags.user_id: expression index tags_user_or_none depends on "
            "the column and would not compile once user_id is uuid: COALESCE types uuid and "
            "character varying cannot be matched",
            "[FAIL] blocker public.tags.user_id: materialized view public.active_tags depends "
            "on the column"):
        assert line in " ".join(result.output.split()), result.output
    assert "a CHECK of the format (length, pattern) has nothing left to check" in " ".join(
        result.output.split())
    for carried in ("own_tags", "active_users", "journal_entries_lower_user",
                    "reminders_user_or_no_time"):
        assert carried not in result.output
    assert "4 problem(s) found" in result.output
    assert print_of(legacy_db, include_backup=True) == before
    assert execute(legacy_db, sql.SQL("SELECT count(*) FROM pg_policies")) == [(3,)]
    assert "own_tags" not in result.output


STATISTICS = """
CREATE STATISTICS tags_user_name (ndistinct, dependencies) ON user_id, name FROM tags;
ALTER STATISTICS tags_user_name SET STATISTICS 500;
COMMENT ON STATISTICS tags_user_name IS 'names per user';
CREATE STATISTICS journal_user_lower ON lower(user_id), title FROM journal_entries;
"""
STATISTICS_SHAPE = ("SELECT stxname, pg_get_statisticsobjdef(oid), nullif(stxstattarget, -1), "
                    "obj_description(oid, 'pg_statistic_ext') FROM pg_statistic_ext "
                    "ORDER BY 1")
BUILT = "SELECT DISTINCT statistics_name FROM pg_stats_ext ORDER BY 1"


def test_statistics_objects_over_the_keys_are_carried_and_built_again(
        shaped: Callable[..., Scenario]) -> None:
    s = shaped(STATISTICS, "ANALYZE tags; ANALYZE journal_entries")
    shape = execute(s.dsn, STATISTICS_SHAPE)
    moved = [(name, definition.replace("ON user_id, name", "ON name, user_id"), *rest)
             for name, definition, *rest in shape]  # the server lists them in table order
    assert execute(s.dsn, BUILT) == [("journal_user_lower",), ("tags_user_name",)]

    def after_swap(dsn: str) -> None:
        assert execute(dsn, STATISTICS_SHAPE) == moved
        assert execute(dsn, BUILT) == [("journal_user_lower",), ("tags_user_name",)]

    def after_rollback(dsn: str) -> None:
        assert execute(dsn, STATISTICS_SHAPE) == moved

    s.round_trip(after_swap=after_swap, after_rollback=after_rollback)


def test_a_lost_statistics_object_fails_verify(legacy_db: str) -> None:
    """Mutation: the statistics check sees one gone or changed."""
    seeded(legacy_db, STATISTICS)
    run_ok(legacy_db, "full_migration")
    execute(legacy_db, "DROP STATISTICS journal_user_lower")
    execute(legacy_db, "ALTER STATISTICS tags_user_name SET STATISTICS 10")
    result = operate(legacy_db, "validate_migration")
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert ("[FAIL] statistics public.journal_entries public.journal_user_lower: statistics "
            "object missing since the backup") in text, text
    assert ("[FAIL] statistics public.tags public.tags_user_name: statistics object changed "
            "since the backup") in text, text


def test_a_statistics_expression_that_does_not_compile_is_refused(legacy_db: str) -> None:
    seeded(legacy_db, "CREATE STATISTICS tags_user_or_none ON coalesce(user_id, 'none'), name "
                      "FROM tags")
    before = print_of(legacy_db, include_backup=True)
    result = operate(legacy_db, "full_migration")
    assert result.exit_code == 1, result.output
    assert ("[FAIL] blocker public.tags.user_id: statistics tags_user_or_none depends on the "
            "column and would not compile once user_id is uuid") in " ".join(
                result.output.split()), result.output
    assert print_of(legacy_db, include_backup=True) == before


IN_TABLESPACE = """
CREATE INDEX tags_user_named ON tags (user_id) TABLESPACE {space} WHERE name <> '';
ALTER INDEX users_pkey SET TABLESPACE {space};
CREATE MATERIALIZED VIEW tag_users TABLESPACE {space} AS SELECT DISTINCT user_id FROM tags;
CREATE UNIQUE INDEX tag_users_user ON tag_users (user_id) TABLESPACE {space};
"""
SPACES = ("SELECT c.relname, t.spcname FROM pg_class c "
          "JOIN pg_tablespace t ON t.oid = c.reltablespace "
          "WHERE c.relnamespace = 'public'::regnamespace ORDER BY 1")


def test_what_lives_in_its_own_tablespace_stays_there(sandbox: Sandbox, legacy_db: str) -> None:
    """pg_get_indexdef leaves the tablespace out: the copies of an index, of a primary key
    and of a materialized view with its index are built where their originals are, both
    ways, and verify sees an index moved away."""
    with connected(legacy_db) as conn:
        database = conn.info.dbname
    admin, space = sandbox.admin_dsn_for(database), f"{sandbox.prefix}_{database}"[:63]
    with connected(admin) as conn, conn.cursor() as cur:
        cur.execute("SET allow_in_place_tablespaces = on")  # a superuser's, PostgreSQL 15+
        cur.execute(sql.SQL("CREATE TABLESPACE {} LOCATION ''").format(sql.Identifier(space)))
        cur.execute(sql.SQL("GRANT CREATE ON TABLESPACE {} TO {}").format(
            sql.Identifier(space), sql.Identifier(OWNER_ROLE)))
    try:
        seeded(legacy_db, IN_TABLESPACE.format(space=space))
        spaces = execute(legacy_db, SPACES)
        assert [name for name, _ in spaces] == ["tag_users", "tag_users_user",
                                                "tags_user_named", "users_pkey"]
        original = print_of(legacy_db)
        run_ok(legacy_db, "full_migration", "--refresh-materialized-views")
        assert execute(legacy_db, SPACES) == spaces
        execute(legacy_db, "ALTER INDEX tags_user_named SET TABLESPACE pg_default")  # mutation
        result = operate(legacy_db, "validate_migration")
        assert "[FAIL] indexes public.tags tags_user_named: index changed since the backup" \
            in " ".join(result.output.split()), result.output
        execute(legacy_db, sql.SQL("ALTER INDEX tags_user_named SET TABLESPACE {}").format(
            sql.Identifier(space)))
        run_ok(legacy_db, "validate_migration")
        run_ok(legacy_db, "rollback", "--refresh-materialized-views")
        assert execute(legacy_db, SPACES) == spaces
        after = print_of(legacy_db)
        assert after == original, "\n".join(original.diff(after))
    finally:  # a tablespace outlives the database: emptied, then dropped
        execute(legacy_db, "DROP MATERIALIZED VIEW IF EXISTS tag_users; "
                           "DROP INDEX IF EXISTS tags_user_named; "
                           "ALTER INDEX IF EXISTS users_pkey SET TABLESPACE pg_default")
        execute(admin, sql.SQL("DROP TABLESPACE {}").format(sql.Identifier(space)))


TUNED = """
ALTER TABLE tags ALTER COLUMN user_id SET STATISTICS 500;
ALTER TABLE tags ALTER COLUMN user_id SET (n_distinct = -0.25);
ALTER TABLE tags CLUSTER ON ix_tags_user_id;
ALTER TABLE users ALTER COLUMN id SET STATISTICS 2000;
ALTER TABLE users CLUSTER ON users_pkey;
"""
TUNING = """
SELECT a.attrelid::regclass::text, a.attname, nullif(a.attstattarget, -1),
       ARRAY(SELECT o FROM unnest(a.attoptions) o WHERE o LIKE 'n_distinct%%'),
       (SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE i.indrelid = a.attrelid AND i.indisclustered)
FROM pg_attribute a
WHERE a.attrelid IN ('users'::regclass, 'tags'::regclass) AND a.attname IN ('id', 'user_id')
ORDER BY 1, 2
"""


def test_a_key_column_s_planner_settings_and_cluster_mark_are_carried(
        legacy_db: str) -> None:
    """A new column has the default statistics target and no n_distinct, and an index
    built again is not the one CLUSTER used: the swap carries all three, both ways."""
    seeded(legacy_db, TUNED)
    tuning = execute(legacy_db, TUNING)
    assert ("tags", "user_id", 500, ["n_distinct=-0.25"], "ix_tags_user_id") in tuning
    assert ("users", "id", 2000, [], "users_pkey") in tuning
    run_ok(legacy_db, "full_migration")
    assert execute(legacy_db, TUNING) == tuning
    run_ok(legacy_db, "rollback")
    assert execute(legacy_db, TUNING) == tuning


def test_an_event_trigger_the_swap_sets_off_is_named_beforehand(
        sandbox: Sandbox, legacy_db: str) -> None:
    """An event trigger (a superuser's) fires inside the swap's locks: validate_schema says
    so, as a warning; one filtered to other commands is not named."""
    with connected(legacy_db) as conn:
        database = conn.info.dbname
    execute(sandbox.admin_dsn_for(database), """
        CREATE TABLE public.ddl_seen (tag text);
        GRANT SELECT ON public.ddl_seen TO PUBLIC;
        CREATE FUNCTION public.note_ddl() RETURNS event_trigger LANGUAGE plpgsql
            SECURITY DEFINER SET search_path = pg_catalog AS $$
        BEGIN INSERT INTO public.ddl_seen SELECT command_tag
              FROM pg_event_trigger_ddl_commands(); END $$;
        CREATE EVENT TRIGGER note_ddl ON ddl_command_end EXECUTE FUNCTION public.note_ddl();
        CREATE EVENT TRIGGER note_schemas ON ddl_command_end WHEN TAG IN ('CREATE SCHEMA')
            EXECUTE FUNCTION public.note_ddl();
        """)
    seeded(legacy_db)
    result = run_ok(legacy_db, "validate_schema")
    text = " ".join(result.output.split())
    assert "[WARN] event_trigger: event trigger note_ddl (ddl_command_end, function " \
        "public.note_ddl) fires for the swap's statements" in text, text
    assert "note_schemas" not in text
    run_ok(legacy_db, "full_migration")
    seen = {tag for (tag,) in execute(legacy_db, "SELECT tag FROM ddl_seen")}
    assert "ALTER TABLE" in seen


KEYED_TRIGGER = """
ALTER TABLE tags ADD COLUMN moved_at timestamptz;
CREATE FUNCTION note_move() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.moved_at := now(); RETURN NEW; END $$;
CREATE TRIGGER tags_moved BEFORE UPDATE OF user_id ON tags FOR EACH ROW
    WHEN (OLD.user_id IS DISTINCT FROM NEW.user_id) EXECUTE FUNCTION note_move();
COMMENT ON TRIGGER tags_moved ON tags IS 'when a tag changes hands';
ALTER TABLE tags ENABLE ALWAYS TRIGGER tags_moved;
"""
TRIGGER_SHAPE = ("SELECT tgname, pg_get_triggerdef(oid), tgenabled::text, "
                 "obj_description(oid, 'pg_trigger') FROM pg_trigger "
                 "WHERE tgrelid = 'tags'::regclass AND NOT tgisinternal "
                 "AND tgname NOT LIKE 'migration%%' ORDER BY 1")


def test_a_trigger_that_names_the_key_is_carried_and_still_fires(legacy_db: str) -> None:
    """UPDATE OF the key, with a WHEN on it: the column could not be dropped under it; the
    swap drops it and creates it again on the new column, state and comment included."""
    seeded(legacy_db, KEYED_TRIGGER)
    shape = execute(legacy_db, TRIGGER_SHAPE)
    assert [row[0] for row in shape] == ["tags_moved"]
    run_ok(legacy_db, "full_migration")
    assert execute(legacy_db, TRIGGER_SHAPE) == shape
    (tag,), (other,) = (execute(legacy_db, "SELECT id FROM tags LIMIT 1")[0],
                        execute(legacy_db, "INSERT INTO users (email) VALUES "
                                           "('new-owner@example.com') RETURNING id")[0])
    execute(legacy_db, "UPDATE tags SET name = name WHERE id = %s", (tag,))
    assert execute(legacy_db, "SELECT moved_at FROM tags WHERE id = %s", (tag,)) == [(None,)]
    execute(legacy_db, "UPDATE tags SET user_id = %s WHERE id = %s", (other, tag))
    assert execute(legacy_db, "SELECT moved_at IS NOT NULL FROM tags WHERE id = %s",
                   (tag,)) == [(True,)]
    run_ok(legacy_db, "rollback")  # the application's write is kept; the trigger is back
    assert execute(legacy_db, TRIGGER_SHAPE) == shape


def test_a_trigger_whose_when_would_not_compile_is_refused(legacy_db: str) -> None:
    seeded(legacy_db, "CREATE FUNCTION is_short(varchar) RETURNS boolean LANGUAGE sql "
                      "IMMUTABLE AS 'SELECT length($1) < 36'",
           "CREATE FUNCTION no_op() RETURNS trigger LANGUAGE plpgsql AS "
           "'BEGIN RETURN NEW; END'",
           "CREATE TRIGGER tags_short BEFORE INSERT ON tags FOR EACH ROW "
           "WHEN (is_short(NEW.user_id)) EXECUTE FUNCTION no_op()")
    text = refusal(legacy_db)
    assert "[FAIL] blocker public.tags.user_id: trigger tags_short depends on the column and " \
        "would not compile once user_id is uuid: function public.is_short(uuid) does not " \
        "exist" in text, text
