"""verify: each check catches the fault it exists for, verify changes nothing, its reports agree.

Each test gets its own copy of a database migrated once per module (50
users from ``migration.rehearsal.seed``, the whole runbook through the CLI), breaks it
in one named way, and runs ``verify`` as an operator would.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg2.errors
import pytest
from click.testing import CliRunner
from psycopg2 import sql

from migration import checks, cli, snapshot
from migration.connection import connect
from migration.model import KeyColumn, Table
from migration.rehearsal.fingerprint import Fingerprint, fingerprint
from migration.rehearsal.sandbox import Sandbox, with_credentials
from migration.report import Finding, Status
from tests.operate import execute, operate, run_verify, seeded, wait_until

USERS = 50
VARIANTS = ("legacy", "legacy_no_fk")
CHECK_NAMES = list(checks.CHECK_NAMES)


# What the migration must carry through besides the tables, in every migrated copy: a
# publication (with a column list on tags), a policy, a view and a statistics object,
# recorded by backup_data.
EXTRAS = """
CREATE PUBLICATION uuidmig_verify FOR TABLE public.users, public.reminders, public.tags (id, name);
CREATE POLICY reminders_open ON public.reminders FOR SELECT USING (NOT done);
CREATE VIEW public.open_reminders AS SELECT user_id, note FROM public.reminders WHERE NOT done;
CREATE STATISTICS public.reminders_user_done ON user_id, done FROM public.reminders;
"""


def migrate(dsn: str, log: Path) -> None:
    """Seed the empty legacy tables and run the whole runbook."""
    seeded(dsn, users=USERS)
    result = CliRunner().invoke(cli.main, ["--operation=full_migration", "--database-url", dsn,
                                           "-q", "--log-file", str(log)])
    assert result.exit_code == 0, result.output


def verify_json(dsn: str, *args: str) -> tuple[int, dict[str, Any]]:
    outcome = run_verify(dsn, "--format=json", *args)
    return outcome.exit_code, json.loads(outcome.output)


def results_of(report: dict[str, Any]) -> dict[str, str]:
    return {check["name"]: check["result"] for check in report["checks"]}


def failed(report: dict[str, Any]) -> set[str]:
    return {name for name, result in results_of(report).items() if result == "fail"}


def results_by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in report["checks"]}


def state(dsn: str) -> tuple[Fingerprint, int]:
    """Everything verify could have changed: tables, backup, log (and the log's row count)."""
    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM public.migration_log")
            row = cur.fetchone()
        assert row is not None
        return fingerprint(conn, include_log=True, include_backup=True), int(row[0])
    finally:
        conn.close()


@pytest.fixture(scope="module")
def templates(sandbox: Sandbox,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A migrated database per schema variant, migrated once, to clone for each test."""
    names = {variant: f"{sandbox.prefix}_verify_{variant}" for variant in VARIANTS}
    try:
        for variant, name in names.items():
            sandbox.drop_database(name)
            dsn = sandbox.create_database(name, variant=variant)
            execute(dsn, EXTRAS)
            migrate(dsn, tmp_path_factory.mktemp("migration") / "migration.log")
        yield names
    finally:
        for name in names.values():
            sandbox.drop_database(name)


@pytest.fixture
def migrated_db(sandbox: Sandbox, templates: dict[str, str]) -> Iterator[Callable[[str], str]]:
    """Makes fresh copies of a migrated database of a variant; yields each copy's owner DSN."""
    made: list[str] = []

    def make(variant: str = "legacy") -> str:
        name = f"{templates[variant]}_{next(_COPIES)}"
        made.append(name)
        return sandbox.clone(templates[variant], name)

    try:
        yield make
    finally:
        for name in made:
            sandbox.drop_database(name)


_COPIES = itertools.count(1)


@pytest.fixture
def migrated(migrated_db: Callable[[str], str]) -> str:
    return migrated_db("legacy")


def dbname(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1]


@dataclass(frozen=True)
class Mutation:
    """One way to break a migrated database, the checks that must fail because of it, and
    those that must warn (advice checks, which never fail)."""

    statement: str
    fails: frozenset[str]
    variant: str = "legacy"
    superuser: bool = False
    warns: frozenset[str] = frozenset()


FIRST_JOURNAL = "(SELECT min(id) FROM public.journal_entries)"
# Mutations of rows are real losses, not the application's writes: made as the
# engine makes its own, the change log does not see them, and the comparison
# with the backup must.  (An application's write would be left out of it.)
UNLOGGED = "SET uuid_migration.engine = 'on';\n"
MUTATIONS = {
    "column_reverted_to_text": Mutation(  # tags.user_id has no FK in this variant
        "ALTER TABLE public.tags ALTER COLUMN user_id TYPE text",
        frozenset({"key_columns_uuid"}), variant="legacy_no_fk"),
    "temporary_column_left": Mutation(  # the engine's: it bears the mark
        "ALTER TABLE public.tags ADD COLUMN user_id_uuid uuid; COMMENT ON COLUMN "
        "public.tags.user_id_uuid IS 'uuid-migration: copy of user_id'",
        frozenset({"no_leftovers"})),
    "copy_of_an_index_left": Mutation(  # as an interrupted rollback before its swap leaves it
        "CREATE INDEX migration_ix_0123456789abcdef ON public.tags (name)",
        frozenset({"no_leftovers"})),
    "invalid_index_left": Mutation(  # the swap's finder of ids that are not UUIDs
        f"CREATE INDEX {KeyColumn(Table('public', 'tags'), 'user_id').invalid_index} "
        "ON public.tags (name)", frozenset({"no_leftovers"})),
    "primary_key_replaced_by_unique": Mutation(
        """
        ALTER TABLE public.users DROP CONSTRAINT users_pkey CASCADE;
        ALTER TABLE public.users ADD CONSTRAINT users_id_key UNIQUE (id);
        ALTER TABLE public.journal_entries ADD CONSTRAINT journal_entries_user_id_fkey
            FOREIGN KEY (user_id) REFERENCES public.users (id) ON DELETE CASCADE;
        """, frozenset({"primary_key", "indexes"}), variant="legacy_no_fk"),
    "child_primary_key_dropped": Mutation(
        "ALTER TABLE public.tags DROP CONSTRAINT tags_pkey", frozenset({"primary_key"})),
    "foreign_key_lost_on_delete_cascade": Mutation(
        """
        ALTER TABLE public.journal_entries DROP CONSTRAINT journal_entries_user_id_fkey;
        ALTER TABLE public.journal_entries ADD CONSTRAINT journal_entries_user_id_fkey
            FOREIGN KEY (user_id) REFERENCES public.users (id);
        """, frozenset({"foreign_keys"})),
    "foreign_key_dropped": Mutation(
        "ALTER TABLE public.tags DROP CONSTRAINT tags_user_id_fkey",
        frozenset({"foreign_keys"})),
    "foreign_key_not_valid": Mutation(
        """
        ALTER TABLE public.reminders DROP CONSTRAINT reminders_user_id_fkey;
        ALTER TABLE public.reminders ADD CONSTRAINT reminders_user_id_fkey
            FOREIGN KEY (user_id) REFERENCES public.users (id) ON DELETE SET NULL NOT VALID;
        """, frozenset({"foreign_keys"})),
    "orphan_inserted_behind_not_valid_foreign_key": Mutation(
        """
        ALTER TABLE public.reminders DROP CONSTRAINT reminders_user_id_fkey;
        SET uuid_migration.engine = 'on';
        INSERT INTO public.reminders (id, user_id, remind_at)
            VALUES ('orphan', gen_random_uuid(), now());
        ALTER TABLE public.reminders ADD CONSTRAINT reminders_user_id_fkey
            FOREIGN KEY (user_id) REFERENCES public.users (id) ON DELETE SET NULL NOT VALID;
        """, frozenset({"foreign_keys", "no_orphans", "row_counts", "uuid_values"})),
    "orphan_in_table_without_foreign_key": Mutation(  # the key differs from the backup too
        UNLOGGED + "UPDATE public.tags SET user_id = gen_random_uuid() "
        "WHERE id = (SELECT min(id) FROM public.tags)",
        frozenset({"no_orphans", "uuid_values"}), variant="legacy_no_fk"),
    "index_dropped": Mutation(  # the only index on reminders.user_id
        "DROP INDEX public.ix_reminders_user_id", frozenset({"indexes"}),
        warns=frozenset({"fk_indexes"})),
    "index_definition_changed": Mutation(  # same name, another predicate
        """
        DROP INDEX public.ix_tags_user_id;
        CREATE INDEX ix_tags_user_id ON public.tags (user_id) WHERE color IS NOT NULL;
        """, frozenset({"indexes"})),
    "index_invalid": Mutation(  # as a failed CREATE INDEX CONCURRENTLY leaves it
        "UPDATE pg_index SET indisvalid = false "
        "WHERE indexrelid = 'public.ix_reminders_user_id'::regclass",
        frozenset({"indexes", "no_leftovers"}), superuser=True,
        warns=frozenset({"fk_indexes"})),
    "index_unusable_for_lookups": Mutation(  # valid, leads with the column, never used:
        """
        DROP INDEX public.ix_reminders_user_id;
        CREATE INDEX ix_reminders_user_id ON public.reminders (user_id) WHERE done;
        CREATE INDEX ix_reminders_done_user_id ON public.reminders (done, user_id);
        """, frozenset({"indexes"}),  # a lookup scans the other index from end to end
        warns=frozenset({"fk_indexes"})),
    "replica_identity_changed": Mutation(
        "ALTER TABLE public.reminders REPLICA IDENTITY FULL", frozenset({"replica_identity"})),
    "table_removed_from_publication": Mutation(
        "ALTER PUBLICATION uuidmig_verify DROP TABLE public.reminders",
        frozenset({"publications"})),
    "publication_column_list_changed": Mutation(
        "ALTER PUBLICATION uuidmig_verify SET TABLE public.users, public.reminders, "
        "public.tags (id)", frozenset({"publications"})),
    "policy_dropped": Mutation(
        "DROP POLICY reminders_open ON public.reminders", frozenset({"policies"})),
    "policy_changed": Mutation(
        "ALTER POLICY reminders_open ON public.reminders USING (done)", frozenset({"policies"})),
    "view_changed": Mutation(
        "CREATE OR REPLACE VIEW public.open_reminders AS SELECT user_id, note "
        "FROM public.reminders", frozenset({"views"})),
    "statistics_dropped": Mutation(
        "DROP STATISTICS public.reminders_user_done", frozenset({"statistics"})),
    "backup_granted_to_public": Mutation(
        """
        GRANT USAGE ON SCHEMA migration_backup TO PUBLIC;
        GRANT SELECT ON migration_backup."public.users" TO PUBLIC;
        """, frozenset({"backup_private"})),
    "row_deleted": Mutation(
        UNLOGGED + "DELETE FROM public.reminders WHERE id = (SELECT min(id) FROM public.reminders)",
        frozenset({"row_counts"})),
    "uuid_changed": Mutation(  # another existing user: no orphan, counts unchanged
        UNLOGGED + "UPDATE public.journal_entries SET user_id = (SELECT id FROM public.users "
        f"WHERE id <> (SELECT user_id FROM public.journal_entries WHERE id = {FIRST_JOURNAL}) "
        f"ORDER BY id LIMIT 1) WHERE id = {FIRST_JOURNAL}",
        frozenset({"uuid_values"})),
    "user_ids_swapped_between_two_rows": Mutation(  # every count and every value set intact
        UNLOGGED + """
        UPDATE public.journal_entries j
        SET user_id = CASE WHEN j.id = a.id THEN b.user_id ELSE a.user_id END
        FROM (SELECT id, user_id FROM public.journal_entries ORDER BY id LIMIT 1) a,
             LATERAL (SELECT id, user_id FROM public.journal_entries k
                      WHERE k.user_id <> a.user_id ORDER BY k.id LIMIT 1) b
        WHERE j.id IN (a.id, b.id)
        """, frozenset({"uuid_values"})),
    "not_null_dropped": Mutation(
        "ALTER TABLE public.journal_entries ALTER user_id DROP NOT NULL",
        frozenset({"not_null"})),
    "default_dropped": Mutation(
        "ALTER TABLE public.users ALTER id DROP DEFAULT", frozenset({"defaults"})),
    "default_changed": Mutation(
        "ALTER TABLE public.users ALTER id SET DEFAULT '00000000-0000-4000-8000-000000000000'",
        frozenset({"defaults"})),
    "unfinished_log_entry": Mutation(
        "INSERT INTO public.migration_log (operation, status) VALUES ('migrate_users', 'running')",
        frozenset({"migration_log"})),
    "table_dropped": Mutation(  # a failure, not a crash
        "DROP TABLE public.reminders CASCADE",
        frozenset({"key_columns_uuid", "primary_key", "indexes", "foreign_keys",
                   "replica_identity", "publications", "policies", "views", "statistics",
                   "not_null", "defaults", "row_counts"})),
}
RECORDED_CHECKS = {"primary_key", "indexes", "foreign_keys", "replica_identity", "publications",
                   "policies", "views", "statistics", "not_null", "defaults"}


def test_every_check_has_a_mutation() -> None:
    assert set().union(*(m.fails | m.warns for m in MUTATIONS.values())) == set(CHECK_NAMES)


def warned(report: dict[str, Any]) -> set[str]:
    return {check["name"] for check in report["checks"]
            if any(f["status"] == "warn" for f in check["findings"])}


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_correct_migration_passes_every_check(
        migrated_db: Callable[[str], str], variant: str) -> None:
    code, report = verify_json(migrated_db(variant))
    assert code == 0, report
    assert results_of(report) == dict.fromkeys(CHECK_NAMES, "pass")
    assert warned(report) == set()
    assert report["passed"] is True


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_each_fault_fails_its_check(
        sandbox: Sandbox, migrated_db: Callable[[str], str], name: str) -> None:
    mutation = MUTATIONS[name]
    dsn = migrated_db(mutation.variant)
    execute(sandbox.admin_dsn_for(dbname(dsn)) if mutation.superuser else dsn,
            mutation.statement)
    code, report = verify_json(dsn)
    assert code == 1, report
    assert failed(report) == mutation.fails, json.dumps(report, indent=2)
    assert warned(report) == mutation.warns, json.dumps(report, indent=2)
    assert report["passed"] is False
    for check in report["checks"]:
        if check["result"] == "fail":
            bad = [f for f in check["findings"] if f["status"] == "fail"]
            assert bad, check
            assert all(f["hint"] for f in bad), check


def test_a_check_that_reports_nothing_fails(
        migrated: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pgTAP runtests() lesson: no result is no pass."""
    silent = tuple(replace(c, run=lambda ctx: []) if "migration_log" in c.describes else c
                   for c in checks.CHECKS)
    monkeypatch.setattr(checks, "CHECKS", silent)
    code, report = verify_json(migrated)
    assert code == 1
    assert failed(report) == {"migration_log"}
    assert "reported nothing" in results_by_name(report)["migration_log"]["detail"]


def test_python_dash_m_exit_codes(migrated: str) -> None:
    """The real process, as CI runs it: DATABASE_URL from the environment."""
    env = {**os.environ, "DATABASE_URL": migrated}

    def exit_code() -> int:
        return subprocess.run([sys.executable, "-m", "migration.verify"], env=env,
                              capture_output=True, check=False).returncode

    assert exit_code() == 0
    execute(migrated, MUTATIONS["unfinished_log_entry"].statement)
    assert exit_code() == 1


def test_without_backup_the_comparison_is_skipped_and_strict_fails(
        migrated: str, tmp_path: Path) -> None:
    cleanup = CliRunner().invoke(cli.main, ["--operation=cleanup_backup", "--database-url",
                                            migrated, "-q", "--log-file", str(tmp_path / "l")])
    assert cleanup.exit_code == 0, cleanup.output
    code, report = verify_json(migrated)
    assert code == 0
    skipped = {n for n, r in results_of(report).items() if r == "skip"}
    assert skipped == {"row_counts", "uuid_values", "backup_private"}
    assert "no backup" in results_by_name(report)["row_counts"]["detail"]
    assert "no backup" in results_by_name(report)["backup_private"]["detail"]
    code, report = verify_json(migrated, "--strict")
    assert code == 1
    assert failed(report) == {"row_counts", "uuid_values", "backup_private"}


TABLE_ROW = re.compile(r"^(\w+)\s+(pass|fail|skip)\s+(.*)$")


def test_json_table_and_junit_reports_agree(migrated: str, tmp_path: Path) -> None:
    execute(migrated, MUTATIONS["index_dropped"].statement)
    execute(migrated, MUTATIONS["row_deleted"].statement)
    junit = tmp_path / "verify.xml"
    table = run_verify(migrated, "--junit-xml", str(junit))
    code, report = verify_json(migrated)
    assert table.exit_code == code == 1
    rows = [m.groups() for m in map(TABLE_ROW.match, table.output.splitlines()) if m]
    assert rows == [(c["name"], c["result"], c["detail"]) for c in report["checks"]]
    for check in report["checks"]:
        for finding in check["findings"]:
            if finding["status"] == "fail":  # expected, found, samples, next step
                as_text = Finding(**{**finding, "status": Status(finding["status"])}).render()
                assert as_text in table.output
    assert report["summary"] in table.output

    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    cases = suite.findall("testcase")
    assert [case.get("name") for case in cases] == CHECK_NAMES
    assert {case.get("name") for case in cases if case.find("failure") is not None} \
        == failed(report) == {"indexes", "row_counts"}
    assert suite.get("tests") == str(len(CHECK_NAMES))
    assert suite.get("failures") == "2"


def test_selected_checks_only(migrated: str) -> None:
    code, report = verify_json(migrated, "--check", "migration_log", "--check", "row_counts")
    assert code == 0
    assert list(results_of(report)) == ["row_counts", "migration_log"]
    assert run_verify(migrated, "--check", "no_such_check").exit_code == 2


# The mutations of rows, which the side-by-side reads find: a missing row, a changed key,
# an orphan (counted, and the row neither the backup's nor a valid key).
SIDE_BY_SIDE_MUTATIONS = ("row_deleted", "uuid_changed",
                          "orphan_inserted_behind_not_valid_foreign_key")


@pytest.mark.parametrize("name", ["none", *SIDE_BY_SIDE_MUTATIONS])
def test_side_by_side_reads_report_what_one_connection_reports(
        migrated_db: Callable[[str], str], name: str) -> None:
    """--jobs 2 (the digests, row comparisons and orphan counts on two more connections in
    the checking transaction's snapshot) reports exactly what --jobs 1 does, in order."""
    mutation = MUTATIONS.get(name)
    dsn = migrated_db(mutation.variant if mutation else "legacy")
    if mutation is not None:
        execute(dsn, mutation.statement)
    one_connection = verify_json(dsn, "--jobs", "1")
    assert failed(one_connection[1]) == (mutation.fails if mutation else set())
    assert verify_json(dsn, "--jobs", "2") == one_connection


@contextmanager
def reads_hooked(monkeypatch: pytest.MonkeyPatch,
                 first: Callable[[], None]) -> Iterator[list[str]]:
    """``first`` run once, before the first of the checks' heavy reads, or before the first
    reader's transaction begins (the others wait for it); yields the names of the threads
    that ran reads."""
    threads: list[str] = []
    once = threading.Lock()
    done: list[bool] = []

    def before_read(relation: str) -> None:
        if relation != snapshot.OPENING:
            threads.append(threading.current_thread().name)
        with once:
            if not done:
                first()
                done.append(True)

    monkeypatch.setattr(snapshot, "before_read", before_read)
    yield threads
    assert done, "no read was made"


APPLICATION_WRITE = ("UPDATE public.reminders SET note = 'changed' "
                     "WHERE id = (SELECT max(id) FROM public.reminders)")


def application_writes(findings: list[dict[str, Any]]) -> list[str]:
    """The messages of the findings that count rows the application wrote since the backup."""
    return [f["message"] for f in findings if f["status"] == "info"]


@pytest.mark.parametrize("command", ["verify", "validate_migration"])
def test_side_by_side_reads_see_only_the_checks_snapshot(
        migrated: str, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    """A row lost and an application's write, both committed after the checking
    transaction took its snapshot, before its readers' transactions begin: neither verify
    nor validate_migration sees them (a reader that did not import the snapshot would see
    the loss, and report row_counts failed; a checking transaction that is not REPEATABLE
    READ would count the write); verify after sees both."""
    def lose_a_row_and_write() -> None:
        execute(migrated, MUTATIONS["row_deleted"].statement)
        execute(migrated, APPLICATION_WRITE)

    with reads_hooked(monkeypatch, lose_a_row_and_write) as threads:
        if command == "verify":
            code, report = verify_json(migrated, "--jobs", "2")
            assert code == 0, report
            assert results_of(report) == dict.fromkeys(CHECK_NAMES, "pass")
            findings = [f for check in report["checks"] for f in check["findings"]]
        else:
            validated = operate(migrated, "validate_migration", "--jobs", "2")
            assert validated.exit_code == 0, validated.output
            [(findings,)] = execute(migrated, "SELECT details -> 'findings' FROM migration_log "
                                              "ORDER BY id DESC LIMIT 1")
    assert application_writes(findings) == []
    assert threads
    assert all(name.startswith("check") for name in threads), threads
    monkeypatch.setattr(snapshot, "before_read", None)
    code, report = verify_json(migrated)
    assert failed(report) == {"row_counts"}
    assert application_writes(results_by_name(report)["row_counts"]["findings"]) == [
        "1 rows changed by the application since the backup: checked, not compared"]


def test_a_read_queued_behind_ddl_is_left_to_the_checking_transaction(
        migrated: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DDL statement queued behind a lock the checking transaction holds (the change log,
    read before the digests) queues the readers behind it, and the checking transaction
    waits for them: each reader gives up its read after a short lock_timeout, and the
    checking transaction, which holds the lock, reads it.  Nothing hangs, both finish."""
    locker = connect(migrated)
    locked: list[str] = []

    def lock() -> None:
        with locker.cursor() as cur:
            cur.execute("SET lock_timeout = '60s'")
            cur.execute("LOCK TABLE migration_backup.change_log IN ACCESS EXCLUSIVE MODE")
        locked.append("granted")

    ddl = threading.Thread(target=lock)

    def queue_ddl() -> None:
        ddl.start()
        assert wait_until(lambda: bool(execute(
            migrated, "SELECT 1 FROM pg_locks WHERE NOT granted AND relation = "
                      "'migration_backup.change_log'::regclass")))

    try:
        with reads_hooked(monkeypatch, queue_ddl):
            code, report = verify_json(migrated, "--jobs", "2", "--check", "row_counts")
        ddl.join()
    finally:
        locker.close()
    assert code == 0, report
    assert results_of(report) == {"row_counts": "pass"}
    assert locked == ["granted"]


def test_list_checks_documents_every_check() -> None:
    listing = run_verify(None, "--list-checks", "--format=json")
    assert listing.exit_code == 0
    assert json.loads(listing.output) == [
        {"name": n, "description": d} for n, d in checks.CHECK_NAMES.items()]
    text = run_verify(None, "--list-checks").output
    assert all(name in text for name in CHECK_NAMES)
    assert "Exit codes" in run_verify(None, "--help").output


SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize("where", ["no_server", "wrong_password"])
def test_could_not_run_exits_2_without_the_password(
        sandbox: Sandbox, where: str, tmp_path: Path) -> None:
    dsn = (f"postgresql://verifier:{SECRET}@127.0.0.1:1/nothing" if where == "no_server"
           else with_credentials(sandbox.admin_dsn, user="app_owner", password=SECRET,
                                 dbname="postgres"))
    junit = tmp_path / "verify.xml"
    for fmt in ("table", "json"):
        outcome = run_verify(dsn, f"--format={fmt}", "--junit-xml", str(junit))
        assert outcome.exit_code == 2, outcome.output
        assert SECRET not in outcome.output
        assert "cannot connect" in outcome.output
    assert json.loads(outcome.output)["exit_code"] == 2
    assert SECRET not in junit.read_text()
    assert ET.parse(junit).getroot().find("testsuite/testcase/error") is not None
    assert run_verify(None).exit_code == 2  # no database at all: a usage error


@contextmanager
def select_only_role(sandbox: Sandbox, dsn: str,
                     grants: str) -> Iterator[tuple[str, str]]:
    """A login role given CONNECT, USAGE on public and ``grants`` (``{r}`` is the role):
    (role, DSN)."""
    role, password = f"verify_reader_{secrets.token_hex(4)}", secrets.token_urlsafe(12)
    db = dbname(dsn)
    sandbox.admin_execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
        sql.Identifier(role), sql.Literal(password)))
    admin_db = sandbox.admin_dsn_for(db)
    execute(admin_db, sql.SQL(
        "GRANT CONNECT ON DATABASE {db} TO {r}; GRANT USAGE ON SCHEMA public TO {r}; "
        + grants).format(db=sql.Identifier(db), r=sql.Identifier(role)))
    try:
        yield role, with_credentials(dsn, user=role, password=password, dbname=db)
    finally:
        execute(admin_db, sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        sandbox.admin_execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture
def reader(sandbox: Sandbox, migrated: str) -> Iterator[tuple[str, str]]:
    """A login role that may only SELECT (no USAGE on migration_backup yet): (role, DSN)."""
    with select_only_role(sandbox, migrated, "GRANT SELECT ON ALL TABLES IN SCHEMA public, "
                                             "migration_backup TO {r}") as found:
        yield found


BACKUP_COMPARISONS = {"row_counts", "uuid_values"}


@pytest.mark.parametrize("log", ["log_granted", "log_private"])
def test_a_monitoring_role_runs_every_check_it_can_while_the_backup_is_private(
        sandbox: Sandbox, migrated: str, log: str) -> None:
    """SELECT on the application's tables only: the comparisons with the private backup
    are skipped, naming the role and why; every other check runs; exit 0, 1 with
    --strict.  The record comes from migration_log where the role may read it."""
    grants = ("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {r}" if log == "log_granted"
              else "GRANT SELECT ON public.users, public.journal_entries, public.tags, "
                   "public.reminders, public.open_reminders TO {r}")
    before = state(migrated)
    with select_only_role(sandbox, migrated, grants) as (role, dsn):
        code, report = verify_json(dsn)
        assert code == 0, report
        skipped = BACKUP_COMPARISONS | (set() if log == "log_granted"
                                        else RECORDED_CHECKS | {"migration_log"})
        assert results_of(report) == {**dict.fromkeys(CHECK_NAMES, "pass"),
                                      **dict.fromkeys(skipped, "skip")}
        for name in skipped:
            detail = results_by_name(report)[name]["detail"]
            assert f"role {role} has no" in detail, detail
            assert "private to app_owner" in detail, detail
        assert verify_json(dsn, "--strict")[0] == 1
    assert state(migrated) == before


def test_a_select_only_role_is_enough_and_nothing_changes(
        sandbox: Sandbox, migrated: str, reader: tuple[str, str]) -> None:
    """The backup is private to the migrating role: a reader given access to it can run
    every check, backup_private (catalog only) included, which names the reader."""
    role, dsn = reader
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        execute(dsn, "DELETE FROM public.migration_log")
    before = state(migrated)
    code, report = verify_json(dsn, "--jobs", "2")  # without USAGE on migration_backup
    assert code == 1, report
    assert results_of(report) == {**dict.fromkeys(CHECK_NAMES, "pass"), "backup_private": "fail",
                                  **dict.fromkeys(BACKUP_COMPARISONS, "skip")}
    execute(sandbox.admin_dsn_for(dbname(migrated)), sql.SQL(
        "GRANT USAGE ON SCHEMA migration_backup TO {}").format(sql.Identifier(role)))
    code, report = verify_json(dsn)
    assert code == 1, report
    assert results_of(report) == {**dict.fromkeys(CHECK_NAMES, "pass"), "backup_private": "fail"}
    assert role in json.dumps(results_by_name(report)["backup_private"]["findings"])
    after = state(migrated)
    assert before[0].diff(after[0]) == []
    assert before == after


def test_passes_on_a_read_only_database_and_changes_nothing(
        sandbox: Sandbox, migrated: str) -> None:
    sandbox.admin_execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on")
                          .format(sql.Identifier(dbname(migrated))))
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
        execute(migrated, "DELETE FROM public.migration_log")
    before = state(migrated)
    code, report = verify_json(migrated, "--jobs", "2")  # its readers read only too
    assert code == 0, report
    assert results_of(report) == dict.fromkeys(CHECK_NAMES, "pass")
    after = state(migrated)
    assert before[0].diff(after[0]) == []
    assert before == after


def test_a_dropped_foreign_key_is_caught_after_the_backup_is_gone(
        migrated_db: Callable[[str], str]) -> None:
    """The expected FKs are kept in migration_log, which outlives cleanup_backup."""
    dsn = migrated_db("legacy")
    cleaned = CliRunner().invoke(cli.main, ["--operation=cleanup_backup", "--database-url", dsn,
                                            "-q", "--log-file", os.devnull])
    assert cleaned.exit_code == 0, cleaned.output
    execute(dsn, "ALTER TABLE tags DROP CONSTRAINT tags_user_id_fkey")
    code, report = verify_json(dsn)
    assert code == 1
    assert failed(report) == {"foreign_keys"}
    assert "tags_user_id_fkey" in json.dumps(results_by_name(report)["foreign_keys"])


def test_record_checks_do_not_pass_without_a_record(migrated: str) -> None:
    """No backup, and no completed backup_data in migration_log: each check says so, and
    skips."""
    cleaned = CliRunner().invoke(cli.main, ["--operation=cleanup_backup", "--database-url",
                                            migrated, "-q", "--log-file", os.devnull])
    assert cleaned.exit_code == 0, cleaned.output
    execute(migrated, "DELETE FROM public.migration_log WHERE operation = 'backup_data'")
    code, report = verify_json(migrated)
    assert code == 0, report  # skipped, not failed: --strict fails them
    checks_by_name = results_by_name(report)
    for name in RECORDED_CHECKS:
        assert checks_by_name[name]["result"] == "skip", checks_by_name[name]
        assert "nothing recorded" in checks_by_name[name]["detail"]
    assert failed(verify_json(migrated, "--strict")[1]) == RECORDED_CHECKS | {
        "row_counts", "uuid_values", "backup_private"}  # no backup: skipped too


def test_a_record_missing_while_the_backup_exists_fails_never_skips(migrated: str) -> None:
    """The backup is never without its record: with neither the backup's nor
    migration_log's, each comparison fails, saying what to do, even with a hand-dropped
    index nobody could otherwise see."""
    execute(migrated, "DROP TABLE IF EXISTS migration_backup.recorded_objects; "
                      "DELETE FROM public.migration_log WHERE operation = 'backup_data'; "
                      "DROP INDEX public.ix_tags_user_id")
    code, report = verify_json(migrated)
    assert code == 1, report
    assert failed(report) == RECORDED_CHECKS
    detail = results_by_name(report)["indexes"]
    assert "migration_backup holds no record" in detail["detail"]
    assert "backup_data again" in detail["findings"][0]["hint"]


def test_the_record_kept_with_the_backup_is_what_verify_compares_with(migrated: str) -> None:
    """migration_log's copy of the record is lost: the backup's own still catches a
    dropped index and foreign key."""
    execute(migrated, "DELETE FROM public.migration_log WHERE operation = 'backup_data'; "
                      "DROP INDEX public.ix_reminders_user_id; "
                      "ALTER TABLE public.tags DROP CONSTRAINT tags_user_id_fkey")
    code, report = verify_json(migrated)
    assert code == 1, report
    assert failed(report) == {"indexes", "foreign_keys"}


def test_not_null_and_default_failures_say_what_was_wanted_and_found(migrated: str) -> None:
    execute(migrated, "ALTER TABLE journal_entries ALTER user_id DROP NOT NULL; "
                      "ALTER TABLE users ALTER id DROP DEFAULT")
    code, report = verify_json(migrated)
    assert code == 1, report
    assert failed(report) == {"not_null", "defaults"}
    [not_null] = results_by_name(report)["not_null"]["findings"]
    assert (not_null["subject"], not_null["expected"], not_null["found"]) == (
        "public.journal_entries user_id", "NOT NULL", "NULL allowed (no NOT NULL)")
    [default] = results_by_name(report)["defaults"]["findings"]
    assert default["subject"] == "public.users id"
    assert "gen_random_uuid()" in default["expected"]
    assert default["found"] == "no default"
    assert "defaults" in run_verify(None, "--list-checks").output


def test_record_checks_fail_on_a_database_without_the_tables(
        sandbox: Sandbox, request: pytest.FixtureRequest) -> None:
    with sandbox.database(f"{sandbox.prefix}_verify_empty_{next(_COPIES)}",
                          variant=None) as dsn:
        code, report = verify_json(dsn)
    assert code == 1
    checks_by_name = results_by_name(report)
    for name in RECORDED_CHECKS:
        assert checks_by_name[name]["result"] == "fail", checks_by_name[name]
        assert "nothing recorded" in checks_by_name[name]["detail"]
    assert "public.users" in json.dumps(checks_by_name["foreign_keys"])


@pytest.mark.parametrize("index", [
    "CREATE INDEX ix_reminders_user_id ON reminders (user_id) WHERE remind_at IS NOT NULL",
    "CREATE INDEX ix_reminders_remind_at_user_id ON reminders (remind_at, user_id)",
], ids=["partial", "second_column"])
def test_an_index_lookups_cannot_use_is_advice_not_failure(
        legacy_db: str, index: str, tmp_path: Path) -> None:
    """The only index on reminders.user_id was already one a lookup cannot use: the
    migration keeps it as it was, full_migration and verify pass, verify advises."""
    execute(legacy_db, f"DROP INDEX ix_reminders_user_id; {index}")
    migrate(legacy_db, tmp_path / "migration.log")
    code, report = verify_json(legacy_db)
    assert code == 0, report
    assert results_of(report) == dict.fromkeys(CHECK_NAMES, "pass")
    assert warned(report) == {"fk_indexes"}
    assert "public.reminders.user_id" in json.dumps(results_by_name(report)["fk_indexes"])


def test_the_backup_stays_private_despite_default_privileges(
        legacy_db: str, tmp_path: Path) -> None:
    """Default privileges would give PUBLIC and another role the backup as it is created."""
    execute(legacy_db, "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO PUBLIC, pg_monitor; "
                       "ALTER DEFAULT PRIVILEGES GRANT USAGE ON SCHEMAS TO PUBLIC")
    migrate(legacy_db, tmp_path / "migration.log")
    code, report = verify_json(legacy_db, "--check", "backup_private")
    assert code == 0, report
    assert results_of(report) == {"backup_private": "pass"}
    assert execute(legacy_db, "SELECT has_schema_privilege('pg_monitor', 'migration_backup', "
                              "'USAGE'), has_table_privilege('pg_monitor', "
                              "'migration_backup.\"public.users\"', 'SELECT')") == [(False, False)]


def test_what_the_migration_adds_to_the_backup_later_stays_private(
        legacy_no_fk_db: str, tmp_path: Path) -> None:
    """Tables created in the backup schema after the backup (quarantined orphans, the names
    the engine chose) are made private too, whatever the default privileges give."""
    execute(legacy_no_fk_db, "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO PUBLIC, "
                             "pg_monitor")
    seeded(legacy_no_fk_db, users=USERS)
    execute(legacy_no_fk_db, "INSERT INTO reminders (user_id, remind_at) "
                             "VALUES ('00000000-0000-4000-8000-0000000000cc', now())")
    result = CliRunner().invoke(cli.main, [
        "--operation=full_migration", "--database-url", legacy_no_fk_db, "-q",
        "--orphans=quarantine", "--log-file", str(tmp_path / "migration.log")])
    assert result.exit_code == 0, result.output
    tables = {name: (public, monitor) for name, public, monitor in execute(
        legacy_no_fk_db, "SELECT c.relname, has_table_privilege('public', c.oid, 'SELECT'), "
                         "has_table_privilege('pg_monitor', c.oid, 'SELECT') FROM pg_class c "
                         "WHERE c.relnamespace = 'migration_backup'::regnamespace "
                         "AND c.relkind = 'r'")}
    assert {"quarantine.public.reminders", "engine_names"} <= set(tables)
    assert not any(public or monitor for public, monitor in tables.values()), tables
    code, report = verify_json(legacy_no_fk_db, "--check", "backup_private")
    assert code == 0, report


RUNBOOK_LOG_QUERIES = (
    "SELECT * FROM migration_log ORDER BY started_at DESC",
    "SELECT operation, status, started_at, completed_at, message FROM migration_log "
    "WHERE started_at > NOW() - INTERVAL '1 day'",
    "SELECT operation, AVG(EXTRACT(EPOCH FROM (completed_at - started_at))) AS "
    "avg_duration_seconds FROM migration_log WHERE status = 'completed' GROUP BY operation",
)


def test_migration_log_is_readable_only_where_the_backup_is(
        legacy_db: str, tmp_path: Path) -> None:
    """Default privileges would give PUBLIC and another role the log (and its sequence) as
    the tool creates it; the runbook's queries still work for the migrating role."""
    execute(legacy_db, "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO PUBLIC, pg_monitor; "
                       "ALTER DEFAULT PRIVILEGES GRANT SELECT, USAGE ON SEQUENCES "
                       "TO PUBLIC, pg_monitor")
    migrate(legacy_db, tmp_path / "migration.log")
    assert execute(legacy_db, """
        SELECT r.rolname, c.relname FROM pg_class c
        CROSS JOIN (SELECT 'pg_monitor' AS rolname UNION ALL SELECT 'public') r
        WHERE c.oid IN ('public.migration_log'::regclass,
                        pg_get_serial_sequence('public.migration_log', 'id')::regclass)
          AND (has_table_privilege(r.rolname, c.oid, 'SELECT')
               OR (c.relkind = 'S' AND has_sequence_privilege(r.rolname, c.oid, 'USAGE')))
        """) == []
    for query in RUNBOOK_LOG_QUERIES:
        assert execute(legacy_db, query)
