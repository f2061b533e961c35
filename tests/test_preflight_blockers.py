"""Objects on a key column that the pre-flight must name before anything changes: foreign
keys out of a key column or spanning several columns, indexes whose operator class or
collation has no uuid counterpart, and ids a ``CHAR(n)`` key holds that the cast rejects.

Each refusal exits 1, leaves the database exactly as it was (``refusal``) and names the
table, the object and the next step; what the quarantine set aside comes back exactly.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import psycopg2
import pytest

from migration.rehearsal.sandbox import Sandbox
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
from tests.shapes import UPDATED_AT

_numbers = itertools.count()

ACCOUNTS = """
CREATE TABLE accounts (id varchar(36) PRIMARY KEY, name text);
INSERT INTO accounts SELECT id, email FROM users;
"""


def test_a_foreign_key_out_of_the_parent_key_is_refused_by_name(legacy_db: str) -> None:
    """users.id referencing accounts.id: the swap's DROP COLUMN would drop it silently."""
    seeded(legacy_db, ACCOUNTS, "ALTER TABLE users ADD CONSTRAINT users_account_fkey "
                                "FOREIGN KEY (id) REFERENCES accounts (id)")
    for operation in ("validate_schema", "full_migration"):
        output = refusal(legacy_db, operation)
        assert ("[FAIL] blocker public.users.id: foreign key users_account_fkey on "
                "public.users (id) references public.accounts (id), which stays character "
                "varying(36): the swap would drop it with the column") in output, output
        assert "--key=public.accounts.id" in output
    execute(legacy_db, "ALTER TABLE users DROP CONSTRAINT users_account_fkey")
    run_ok(legacy_db, "validate_schema")


def test_a_foreign_key_out_of_a_child_key_is_refused_by_name(legacy_db: str) -> None:
    seeded(legacy_db, ACCOUNTS, "ALTER TABLE reminders ADD CONSTRAINT reminders_account_fkey "
                                "FOREIGN KEY (user_id) REFERENCES accounts (id)")
    output = refusal(legacy_db, "validate_schema")
    assert ("[FAIL] blocker public.reminders.user_id: foreign key reminders_account_fkey on "
            "public.reminders (user_id) references public.accounts (id), which stays "
            "character varying(36)") in output, output
    assert "reminders_user_id_fkey" not in output  # the plan's own FK is carried


def test_composite_foreign_keys_on_a_key_are_refused_in_either_direction(
        legacy_db: str) -> None:
    """Into tags' UNIQUE (user_id, name), and out of (user_id, name) into another table:
    the first made the swap fail late ("Use DROP ... CASCADE"), the second was dropped."""
    seeded(legacy_db,
           "CREATE TABLE tag_uses (id serial PRIMARY KEY, user_id varchar(36), tag text,"
           " CONSTRAINT tag_uses_tag_fkey FOREIGN KEY (user_id, tag)"
           " REFERENCES tags (user_id, name));"
           "INSERT INTO tag_uses (user_id, tag) SELECT user_id, name FROM tags",
           "CREATE TABLE labels (owner varchar(36), label varchar(64),"
           " PRIMARY KEY (owner, label));"
           "INSERT INTO labels SELECT user_id, name FROM tags;"
           "ALTER TABLE tags ADD CONSTRAINT tags_label_fkey FOREIGN KEY (user_id, name)"
           " REFERENCES labels (owner, label)")
    output = refusal(legacy_db, "validate_schema")
    for line in (
            "[FAIL] blocker public.tags.user_id: foreign key tag_uses_tag_fkey on "
            "public.tag_uses (user_id, tag) references public.tags (user_id, name)",
            "[FAIL] blocker public.tags.user_id: foreign key tags_label_fkey on public.tags "
            "(user_id, name) references public.labels (owner, label)"):
        assert line in output, output
    assert output.count("spans 2 columns") == 2, output
    assert "2 problem(s) found" in output


def test_a_composite_foreign_key_to_the_parent_brings_its_paired_column_into_the_plan(
        legacy_db: str) -> None:
    """The plan took a composite FK's first column, here an email, as the referencing one,
    and the pre-flight then read emails as UUIDs."""
    seeded(legacy_db, "CREATE UNIQUE INDEX users_email_id ON users (email, id);"
                      "CREATE TABLE shares (owner_email text, owner varchar(36),"
                      " CONSTRAINT shares_owner_fkey FOREIGN KEY (owner_email, owner)"
                      " REFERENCES users (email, id));"
                      "INSERT INTO shares SELECT email, id FROM users")
    output = refusal(legacy_db, "validate_schema")
    assert ("[FAIL] blocker public.shares.owner: foreign key shares_owner_fkey on "
            "public.shares (owner_email, owner) references public.users (email, id) spans 2 "
            "columns") in output, output
    assert "owner_email" not in output.replace("(owner_email, owner)", "")
    assert "1 problem(s) found" in output


def test_a_foreign_key_into_a_child_key_is_refused_by_name(legacy_db: str) -> None:
    """Only the parent key's referencing columns join the plan: a FK into a child key
    would make the swap fail."""
    seeded(legacy_db, "CREATE UNIQUE INDEX reminders_one_per_user ON reminders (user_id);"
                      "DELETE FROM reminders r WHERE EXISTS (SELECT 1 FROM reminders o "
                      "WHERE o.user_id = r.user_id AND o.id < r.id)",
           "CREATE TABLE snoozes (reminder_user varchar(36) REFERENCES reminders (user_id))")
    output = refusal(legacy_db, "validate_schema")
    assert ("[FAIL] blocker public.reminders.user_id: foreign key snoozes_reminder_user_fkey "
            "on public.snoozes (reminder_user) references public.reminders (user_id)") in output


INDEXES = """
CREATE INDEX tags_user_prefix ON tags (user_id varchar_pattern_ops);
CREATE INDEX users_id_prefix ON users (id text_pattern_ops) WHERE is_active;
CREATE INDEX reminders_user_c ON reminders (user_id COLLATE "C", remind_at);
"""


def test_indexes_whose_operator_class_or_collation_has_no_uuid_form_are_refused(
        legacy_db: str) -> None:
    seeded(legacy_db, INDEXES)
    output = refusal(legacy_db, "full_migration")
    for line in (
            "[FAIL] blocker public.users.id: index users_id_prefix depends on the column and "
            "cannot be built on the uuid column: operator class \"text_pattern_ops\" does not "
            "accept data type uuid",
            "[FAIL] blocker public.tags.user_id: index tags_user_prefix depends on the column "
            "and cannot be built on the uuid column: operator class \"varchar_pattern_ops\" "
            "does not accept data type uuid",
            "[FAIL] blocker public.reminders.user_id: index reminders_user_c depends on the "
            "column and cannot be built on the uuid column: collations are not supported by "
            "type uuid"):
        assert line in output, output
    assert "3 problem(s) found" in output
    for plain in ("ix_tags_user_id", "tags_user_id_name_key", "users_pkey"):
        assert plain not in output


def test_the_first_step_names_the_blockers_of_every_column_it_will_convert(
        legacy_db: str) -> None:
    """migrate_users judged only users.id: a child's CHECK came one run later, from
    migrate_foreign_keys, after users.id had been expanded."""
    seeded(legacy_db, UPDATED_AT,
           "ALTER TABLE users ADD COLUMN id_key text GENERATED ALWAYS AS (upper(id)) STORED",
           "ALTER TABLE tags ENABLE ROW LEVEL SECURITY; CREATE POLICY active_tags ON tags "
           "USING (user_id IN (SELECT id FROM users WHERE is_active))",
           "ALTER TABLE reminders ADD CONSTRAINT reminders_user_given "
           "CHECK (coalesce(user_id, '') <> '')")
    run_ok(legacy_db, "backup_data")
    output = refusal(legacy_db, "migrate_users")
    for line in (
            "[FAIL] trigger_fires public.users.id: trigger users_updated_at on public.users",
            "[FAIL] blocker public.users.id: generated column id_key depends on the column",
            "[FAIL] blocker public.users.id: policy active_tags on public.tags depends on the "
            "column and would not compile once id is uuid",
            "[FAIL] blocker public.reminders.user_id: constraint reminders_user_given (CHECK "):
        assert line in output, output
    assert "4 problem(s) found" in output


ORPHAN = "00000000-0000-4000-8000-0000000000aa"
NOT_VALID_FK = f"""
ALTER TABLE reminders DROP CONSTRAINT reminders_user_id_fkey;
INSERT INTO reminders (id, user_id, remind_at, note)
    VALUES (gen_random_uuid()::text, '{ORPHAN.upper()}', now(), 'orphan');
ALTER TABLE reminders ADD CONSTRAINT reminders_user_id_fkey FOREIGN KEY (user_id)
    REFERENCES users (id) ON DELETE SET NULL NOT VALID;
COMMENT ON CONSTRAINT reminders_user_id_fkey ON reminders IS 'old rows may be orphans';
"""


@pytest.mark.parametrize("stage", ["after the swap", "before the swap"])
def test_orphans_quarantined_under_a_not_valid_foreign_key_are_put_back_exactly(
        legacy_db: str, sandbox: Sandbox, stage: str) -> None:
    """The NOT VALID FK refused them as new rows: rollback failed on every rerun, leaving
    them only in the backup schema."""
    seeded(legacy_db, NOT_VALID_FK)
    original = print_of(legacy_db)
    if stage == "after the swap":
        run_ok(legacy_db, "full_migration", "--orphans=quarantine")
    else:  # the connection killed while the children fill, after the quarantine
        with connected(legacy_db) as conn:
            admin = sandbox.admin_dsn_for(conn.info.dbname)
        with pytest.raises(psycopg2.OperationalError):
            run_in_process(legacy_db, "full_migration", admin_dsn=admin,
                           crash_at="batch public.reminders.user_id#1",
                           settings=Settings(batch_size=7, show_progress=False,
                                             orphans="quarantine"))
    assert execute(legacy_db, "SELECT count(*) FROM reminders WHERE note = 'orphan'") == [(0,)]
    run_ok(legacy_db, "rollback")
    after = print_of(legacy_db)
    assert after == original, "\n".join(original.diff(after))
    assert execute(legacy_db, "SELECT user_id FROM reminders WHERE note = 'orphan'") == [
        (ORPHAN.upper(),)]
    assert execute(legacy_db, "SELECT convalidated, obj_description(oid, 'pg_constraint') "
                              "FROM pg_constraint WHERE conname = 'reminders_user_id_fkey'") \
        == [(False, "old rows may be orphans")]


@pytest.fixture
def database(sandbox: Sandbox) -> Iterator[str]:
    with sandbox.database(f"preflight_{next(_numbers)}", variant=None) as dsn:
        yield dsn


UNHYPHENATED = "992a0e9f0bcbadc3ce1e272ad749f2ff"
DEVICES = f"""
CREATE TABLE devices (id char(36) PRIMARY KEY, name text NOT NULL);
INSERT INTO devices SELECT gen_random_uuid()::text, 'device ' || i FROM generate_series(1, 30) i;
INSERT INTO devices VALUES ('{UNHYPHENATED}', 'written without hyphens');
"""


def test_a_char_key_value_the_cast_rejects_is_named_and_discover_agrees(database: str) -> None:
    """The cast to uuid reads a CHAR(n) value with its padding: the 32 hex digits padded
    with four spaces are no UUID to it, whatever the text comparison says."""
    execute(database, DEVICES)
    for operation in ("validate_schema", "full_migration"):
        output = refusal(database, operation, "--key=public.devices.id")
        assert "[FAIL] invalid_uuid public.devices.id: 1 value(s) are not UUIDs" in output, output
        assert f"table='public.devices', id='{UNHYPHENATED} '" in output, output  # padded
    result = operate(database, "validate_schema", "--discover", "--format=json")
    assert result.exit_code == 0, result.output
    assert "public.devices.id" not in [c["column"] for c in json.loads(result.output)["columns"]]
    execute(database, "UPDATE devices SET id = %s::uuid::text WHERE id = %s",
            (UNHYPHENATED, UNHYPHENATED))
    run_ok(database, "validate_schema", "--key=public.devices.id")
    result = operate(database, "validate_schema", "--discover", "--format=json")
    assert "public.devices.id" in [c["column"] for c in json.loads(result.output)["columns"]]
