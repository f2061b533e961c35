"""Application schemas the pre-flight must see whole: triggers the fill would fire,
trigger bodies that use the key, generated columns, unique indexes with NULLs.

Each shape is added to the legacy schema before the migration; a refusal must
name everything at once and change nothing (the fingerprint proves it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from psycopg2 import sql

from migration.preflight import UniqueIndex, collision_indexes
from migration.rehearsal.sandbox import OWNER_ROLE, Sandbox
from tests.operate import SEEDED_USERS, execute, operate, print_of, refusal, run_ok, seeded
from tests.scenario import Scenario
from tests.shapes import UPDATED_AT

# The body names its table without a schema, as applications do.
AUDIT = """
CREATE TABLE audit_log (email text, op text);
CREATE FUNCTION audit_users() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO audit_log (email, op) VALUES (NEW.email, TG_OP); RETURN NEW; END$$;
CREATE TRIGGER users_audit AFTER UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION audit_users();
"""

LOWER_ID = """
CREATE FUNCTION lower_id() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.id := lower(NEW.id); RETURN NEW; END$$;
CREATE TRIGGER users_lower_id BEFORE INSERT ON users
    FOR EACH ROW EXECUTE FUNCTION lower_id();
"""

STAMPS = "SELECT id::text, updated_at FROM users ORDER BY id::text"


@contextmanager
def may_set_replication_role(sandbox: Sandbox) -> Iterator[None]:
    """The owner granted SET on session_replication_role (PostgreSQL 15+), for a with-block:
    the grant is the cluster's, so it is taken back after."""
    role = sql.Identifier(OWNER_ROLE)
    sandbox.admin_execute(sql.SQL(
        "GRANT SET ON PARAMETER session_replication_role TO {}").format(role))
    try:
        yield
    finally:
        sandbox.admin_execute(sql.SQL(
            "REVOKE SET ON PARAMETER session_replication_role FROM {}").format(role))


def test_a_role_that_may_set_the_replication_role_fills_without_firing_the_triggers(
        legacy_db: str, sandbox: Sandbox) -> None:
    seeded(legacy_db, UPDATED_AT, AUDIT)
    stamps = execute(legacy_db, STAMPS)
    with may_set_replication_role(sandbox):
        report = run_ok(legacy_db, "validate_schema", "--verbose").output
        run_ok(legacy_db, "full_migration")
    assert ("[INFO] trigger_quiet public.users.id: trigger users_updated_at on public.users "
            "(BEFORE UPDATE FOR EACH ROW, function public.touch_updated_at()) will not fire "
            "for the fill (session_replication_role = replica)") in report
    assert execute(legacy_db, STAMPS) == stamps
    assert execute(legacy_db, "SELECT count(*) FROM audit_log") == [(0,)]
    assert execute(legacy_db, "SELECT data_type FROM information_schema.columns "
                              "WHERE table_name = 'users' AND column_name = 'id'") == [("uuid",)]


def test_without_that_privilege_the_triggers_the_fill_fires_are_refused_by_name(
        legacy_db: str) -> None:
    seeded(legacy_db, UPDATED_AT, AUDIT)
    before = print_of(legacy_db, include_backup=True)
    result = operate(legacy_db, "full_migration")
    assert result.exit_code == 1, result.output
    for name, timing, function in (("users_updated_at", "BEFORE", "public.touch_updated_at()"),
                                   ("users_audit", "AFTER", "public.audit_users()")):
        assert (f"trigger_fires public.users.id: trigger {name} on public.users ({timing} "
                f"UPDATE FOR EACH ROW, function {function}) fires for every row the fill "
                "of id_uuid updates") in result.output
    assert "GRANT SET ON PARAMETER session_replication_role" in result.output
    assert print_of(legacy_db, include_backup=True) == before


def test_allow_triggers_lets_them_fire_with_the_roles_own_search_path(legacy_db: str) -> None:
    """The audit trigger names audit_log without a schema: under the engine's
    search_path (pg_catalog) the fill would fail on it."""
    seeded(legacy_db, UPDATED_AT, AUDIT)
    result = run_ok(legacy_db, "full_migration", "--allow-triggers")
    assert ("warning: public.users.id: trigger users_audit on public.users (AFTER UPDATE FOR "
            "EACH ROW, function public.audit_users()) fires for every row the fill of id_uuid "
            "updates (accepted by --allow-triggers)") in result.output
    assert execute(legacy_db, "SELECT count(*), count(DISTINCT email) FROM audit_log") == [
        (SEEDED_USERS, SEEDED_USERS)]
    assert execute(legacy_db, "SELECT count(*) FROM users "
                              "WHERE updated_at = '2000-01-01'") == [(0,)]


def test_a_trigger_whose_body_uses_the_key_is_refused_unless_accepted(legacy_db: str) -> None:
    seeded(legacy_db, LOWER_ID)
    before = print_of(legacy_db, include_backup=True)
    refused = operate(legacy_db, "full_migration")
    assert refused.exit_code == 1, refused.output
    assert ("[FAIL] trigger_uses_key public.users.id: trigger users_lower_id on public.users "
            "(BEFORE INSERT FOR EACH ROW, function public.lower_id()) names id in its "
            "function's body") in refused.output
    assert "review the body for text operations on id" in refused.output
    assert print_of(legacy_db, include_backup=True) == before
    accepted = run_ok(legacy_db, "full_migration", "--allow-triggers")
    assert ("warning: public.users.id: trigger users_lower_id on public.users (BEFORE INSERT "
            "FOR EACH ROW, function public.lower_id()) names id") in accepted.output


def test_a_generated_column_on_a_key_is_refused_by_name(legacy_db: str) -> None:
    seeded(legacy_db, "ALTER TABLE journal_entries ADD COLUMN user_key text "
                      "GENERATED ALWAYS AS (upper(user_id)) STORED")
    before = print_of(legacy_db, include_backup=True)
    result = operate(legacy_db, "full_migration")
    assert result.exit_code == 1, result.output
    assert ("blocker public.journal_entries.user_id: generated column user_key depends on "
            "the column") in result.output
    assert print_of(legacy_db, include_backup=True) == before


def test_every_blocker_of_every_column_is_named_in_one_refusal(legacy_db: str) -> None:
    seeded(legacy_db, UPDATED_AT,
           "ALTER TABLE users ADD CONSTRAINT users_id_given CHECK (coalesce(id, '') <> '')",
           "CREATE MATERIALIZED VIEW active_reminders AS SELECT user_id, note FROM reminders",
           "CREATE POLICY tagged_users ON tags USING "
           "(user_id IN (SELECT id FROM users WHERE is_active))",
           "ALTER TABLE journal_entries ADD COLUMN user_key text "
           "GENERATED ALWAYS AS (upper(user_id)) STORED")
    before = print_of(legacy_db, include_backup=True)
    result = operate(legacy_db, "full_migration")
    assert result.exit_code == 1, result.output
    for line in (
            "[FAIL] blocker public.users.id: constraint users_id_given (CHECK",
            "[FAIL] blocker public.users.id: policy tagged_users on public.tags depends on "
            "the column and would not compile once id is uuid",
            "[FAIL] blocker public.reminders.user_id: materialized view "
            "public.active_reminders depends on the column",
            "[FAIL] blocker public.journal_entries.user_id: generated column user_key depends "
            "on the column",
            "[FAIL] trigger_fires public.users.id: trigger users_updated_at on public.users"):
        assert line in result.output
    assert "5 problem(s) found" in result.output
    assert print_of(legacy_db, include_backup=True) == before


def test_a_rule_on_update_of_a_plan_table_is_refused(legacy_db: str) -> None:
    """The fill's batch is an UPDATE inside a WITH, which no rule may rewrite."""
    seeded(legacy_db, "CREATE TABLE tag_changes (name text);"
                      "CREATE RULE log_tag_change AS ON UPDATE TO tags "
                      "DO ALSO INSERT INTO tag_changes VALUES (NEW.name)")
    before = print_of(legacy_db, include_backup=True)
    result = operate(legacy_db, "full_migration")
    assert result.exit_code == 1, result.output
    assert ("[FAIL] rule_fires public.tags.user_id: rule log_tag_change on public.tags "
            "rewrites the fill's UPDATE") in result.output
    assert print_of(legacy_db, include_backup=True) == before


CLIENT_COLUMNS = ("ALTER TABLE tags ADD COLUMN client_id text, ADD COLUMN client_ref text;"
                  "UPDATE tags SET client_id = 'web', client_ref = id")


def spelled_twice(dsn: str) -> str:
    """Two tags of one user, one spelling its id in upper case, both for a local
    client (client columns NULL); the user's id."""
    user = str(execute(dsn, "SELECT min(id) FROM users")[0][0])
    execute(dsn, "INSERT INTO tags (user_id, name) VALUES (%s, 'local a'), (%s, 'local b')",
            (user, user.upper()))
    return user


def test_rows_with_a_null_in_a_nulls_distinct_unique_index_do_not_collide(
        legacy_no_fk_db: str) -> None:
    seeded(legacy_no_fk_db, CLIENT_COLUMNS, "CREATE UNIQUE INDEX tags_consent "
                                            "ON tags (user_id, client_id, client_ref)")
    user = spelled_twice(legacy_no_fk_db)
    run_ok(legacy_no_fk_db, "full_migration")
    assert execute(legacy_no_fk_db, "SELECT count(*) FROM tags WHERE user_id = %s "
                                    "AND client_id IS NULL AND client_ref IS NULL",
                   (user,)) == [(2,)]


def test_a_nulls_not_distinct_unique_index_collides_on_nulls(legacy_no_fk_db: str) -> None:
    seeded(legacy_no_fk_db, CLIENT_COLUMNS, "CREATE UNIQUE INDEX tags_consent "
                                            "ON tags (user_id, client_id, client_ref) "
                                            "NULLS NOT DISTINCT")
    user = spelled_twice(legacy_no_fk_db)
    before = print_of(legacy_no_fk_db, include_backup=True)
    result = operate(legacy_no_fk_db, "full_migration")
    assert result.exit_code == 1, result.output
    assert ("collision public.tags.user_id: 1 group(s) of rows become equal on "
            "(user_id, client_id, client_ref)") in result.output
    assert f"user_id=[{user.upper()!r}, {user!r}]" in result.output
    assert print_of(legacy_no_fk_db, include_backup=True) == before


def test_a_collision_seen_through_several_unique_indexes_is_reported_once(
        legacy_db: str) -> None:
    """The primary key, a redundant unique index on it and a wider one all see the same
    two spellings of one id: one finding, through the narrowest index."""
    seeded(legacy_db, "CREATE UNIQUE INDEX users_id_uindex ON users (id)",
           "CREATE UNIQUE INDEX users_id_name ON users (id, display_name) NULLS NOT DISTINCT",
           "INSERT INTO users (id, email, display_name) SELECT upper(id), 'twin@example.com', "
           "display_name FROM users ORDER BY id LIMIT 1")
    output = refusal(legacy_db, "validate_schema")
    assert output.count("collision public.users.id") == 1, output
    assert "collision public.users.id: 1 group(s) of rows become equal on (id) " in output


@pytest.mark.parametrize(("indexes", "kept"), [
    ([(["id"], True, None), (["id"], True, None)], [0]),  # a redundant unique index
    ([(["id", "name"], True, None), (["id"], True, None)], [1]),
    ([(["id"], True, "(name IS NULL)"), (["id"], True, None)], [1]),
    ([(["id"], True, "(name IS NULL)"), (["id"], True, "(name > 'a'::text)")], [0, 1]),
    # (id, a) leaves out rows whose a is NULL: (id, a, b) NULLS NOT DISTINCT groups them
    ([(["id", "a"], True, None), (["id", "a", "b"], False, None)], [0, 1]),
    ([(["id", "a"], False, None), (["id", "a", "b"], False, None)], [0]),
    ([(["id", "a"], True, None), (["id", "b"], True, None)], [0, 1]),
])
def test_collisions_are_looked_for_through_the_indexes_that_show_each_once(
        indexes: list[tuple[list[str], bool, str | None]], kept: list[int]) -> None:
    given = [UniqueIndex(*index) for index in indexes]
    assert collision_indexes(given, "id") == [given[i] for i in kept]


@pytest.mark.parametrize("second", ["other", "local b"], ids=["outside", "inside"])
def test_a_partial_unique_index_constrains_only_the_rows_it_covers(
        legacy_no_fk_db: str, second: str) -> None:
    """The second spelling of one user's id on a row the index leaves out, or covers."""
    outside = second == "other"
    seeded(legacy_no_fk_db, CLIENT_COLUMNS, "CREATE UNIQUE INDEX tags_one_local "
                                            "ON tags (user_id) WHERE client_id IS NULL "
                                            "AND name LIKE 'local%%'")  # % escaped for psycopg2
    user = str(execute(legacy_no_fk_db, "SELECT min(id) FROM users")[0][0])
    execute(legacy_no_fk_db, "INSERT INTO tags (user_id, name) VALUES (%s, 'local a'), "
                             "(%s, %s)", (user, user.upper(), second))
    result = operate(legacy_no_fk_db, "validate_schema")
    assert result.exit_code == (0 if outside else 1), result.output
    assert ("collision public.tags.user_id" in result.output) is not outside


REPLICA_IDENTITY = """
ALTER TABLE tags REPLICA IDENTITY USING INDEX tags_user_id_name_key;
CREATE PUBLICATION app_changes FOR TABLE users, tags;
COMMENT ON COLUMN tags.user_id IS 'owner of the tag';
COMMENT ON INDEX ix_tags_user_id IS 'lookups by owner';
COMMENT ON CONSTRAINT tags_user_id_fkey ON tags IS 'every tag has an owner';
"""
IDENTITY = ("SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE i.indrelid = 'tags'::regclass AND i.indisreplident")
COMMENTS = ("SELECT col_description('tags'::regclass, (SELECT attnum FROM pg_attribute "
            "WHERE attrelid = 'tags'::regclass AND attname = 'user_id')), "
            "obj_description('ix_tags_user_id'::regclass, 'pg_class'), "
            "(SELECT obj_description(oid, 'pg_constraint') FROM pg_constraint "
            "WHERE conname = 'tags_user_id_fkey')")


def test_replica_identity_publication_and_comments_are_carried_through(legacy_db: str) -> None:
    """A published table whose replica identity is an index on the key: every UPDATE of it
    needs that identity.  The swap gives it back to the renamed copy, with the comments,
    and verify judges it against the record; the rollback carries it back too."""
    seeded(legacy_db, REPLICA_IDENTITY)
    original, comments = print_of(legacy_db), execute(legacy_db, COMMENTS)
    run_ok(legacy_db, "full_migration")
    assert execute(legacy_db, IDENTITY) == [("tags_user_id_name_key",)]
    assert execute(legacy_db, COMMENTS) == comments
    execute(legacy_db, "UPDATE tags SET color = '#00ff00'")  # fails without a replica identity
    run_ok(legacy_db, "rollback")
    assert execute(legacy_db, IDENTITY) == [("tags_user_id_name_key",)]
    assert execute(legacy_db, COMMENTS) == comments
    execute(legacy_db, "UPDATE tags SET color = NULL")
    after = print_of(legacy_db)
    assert after.schema == original.schema, "\n".join(original.diff(after))


PUBLISHED = ("SELECT pubname, tablename, ARRAY(SELECT unnest(attnames) ORDER BY 1), rowfilter "
             "FROM pg_publication_tables ORDER BY 1, 2")


def test_publication_column_lists_and_row_filters_on_the_key_are_carried(
        shaped: Callable[..., Scenario]) -> None:
    """A publication's column list or row filter depends on the column (DROP COLUMN would
    fail): the swap takes the table out and puts it back as it was, both ways."""
    s = shaped("CREATE PUBLICATION tag_columns FOR TABLE tags (id, user_id, name)",
               "CREATE PUBLICATION new_tags FOR TABLE tags WHERE (user_id IS NOT NULL) "
               "WITH (publish = 'insert')",
               "CREATE PUBLICATION user_emails FOR TABLE users (id, email), reminders")
    published = execute(s.dsn, PUBLISHED)
    assert len(published) == 4

    def after_swap(dsn: str) -> None:
        assert execute(dsn, PUBLISHED) == published
        execute(dsn, "UPDATE tags SET color = color")  # published: needs its identity
        execute(dsn, "ALTER PUBLICATION tag_columns SET TABLE tags (id, name)")
        result = operate(dsn, "validate_migration")  # mutation: the list is compared
        assert result.exit_code == 1
        assert "[FAIL] publications public.tags tag_columns: publication membership changed" \
            in " ".join(result.output.split()), result.output
        execute(dsn, "ALTER PUBLICATION tag_columns SET TABLE tags (id, user_id, name)")

    def after_rollback(dsn: str) -> None:
        assert execute(dsn, PUBLISHED) == published
        execute(dsn, "UPDATE tags SET color = color")

    s.round_trip(after_swap=after_swap, after_rollback=after_rollback)


def test_a_row_filter_that_would_not_compile_is_refused_by_its_name(legacy_db: str) -> None:
    seeded(legacy_db, "CREATE PUBLICATION named_tags FOR TABLE tags "
                      "WHERE (coalesce(user_id, '') <> '') WITH (publish = 'insert')")
    before = print_of(legacy_db)
    result = operate(legacy_db, "full_migration")
    assert result.exit_code == 1
    assert ("blocker public.tags.user_id: publication named_tags (its column list or row "
            "filter) depends on the column and would not compile once user_id is uuid") \
        in " ".join(result.output.split()), result.output
    assert print_of(legacy_db) == before
