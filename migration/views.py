"""Views over a key column: found before anything changes, carried through the swap.

A view that reads a key column (or a view over such a view) would make
``DROP COLUMN`` fail.  The swap drops them, outermost first, and creates them
again after the renames, innermost first, from the server's own deparse of
each (``pg_get_viewdef``, read in the swap's transaction), with their options
(``security_barrier``, ``security_invoker``, ``check_option``), owner,
privileges, comments, and their triggers (``INSTEAD OF``, the updatable-view
pattern) and rules, from the server's text of each: catalog work only, no
scan.  A view whose rule writes a key column is carried with the views over
it, though its query may not read the column.

Whether a definition still compiles once the columns have their new types is
asked of the server up front (``compile_failures``): in a savepoint rolled
back, each table of the plan gets an empty temporary twin whose key columns
have the new type, and each view is created as a temporary view over the
twins.  Nothing is changed and nothing is read.

Their triggers and rules are judged the same way, created on the temporary
views.  A trigger's function is not compiled by the server until it runs: the
pre-flight looks at its body for the key column's name (``preflight``).

Materialized views are refused unless the operator accepts their refresh
(``--refresh-materialized-views``): refreshing one in the swap would run its
query under the tables' locks, so the swap creates it empty, with its indexes,
records it in the backup schema (``pending_refresh``), and it is refreshed
after the commit; its twin in the check is an empty table of its query.

Refused, by name: column defaults on the views, anything else that depends
on them (functions with a SQL body, ...), and views whose owner this role
cannot act for.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psycopg2
import psycopg2.errors
from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from migration import backup, catalog, sqlexpr
from migration.catalog import Blocker
from migration.connection import Connection
from migration.errors import MigrationError
from migration.model import KeyColumn, Table

MATERIALIZED_HINT = (
    "pass --refresh-materialized-views to have the swap create it again empty and refresh "
    "it right after (its readers wait for that refresh; the application's writes do not), "
    "or drop it before the migration and create it again after")
VIEW_HINT = ("rewrite the view so that it holds for the new type (compare with ::text where "
             "text is meant), or drop it before the migration and create it again after")
DEPENDENT_HINT = ("drop it before the migration and create it again after: the swap drops and "
                  "recreates the view it depends on")
PRIVILEGES = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES",
                        "TRIGGER", "MAINTAIN"})
"""What aclexplode can name on a view (MAINTAIN from PostgreSQL 17)."""


@dataclass(frozen=True)
class ViewObject:
    """A trigger or rule on a view, as the server prints it: it goes with its view when
    the swap drops it, and is created again after it."""

    kind: str  # "TRIGGER" or "RULE", as COMMENT ON names it
    name: str
    definition: str  # pg_get_triggerdef / pg_get_ruledef, fully qualified
    comment: str | None
    source: str | None  # a trigger's function's body, which the pre-flight reads


@dataclass(frozen=True)
class ViewDef:
    """A view (or materialized view) that depends on a key column, directly or through
    other views, as the swap must create it again."""

    oid: int
    view: Table
    materialized: bool
    depth: int  # 1: reads a key column; n: over a view of depth n - 1
    definition: str  # pg_get_viewdef, fully qualified (the engine's search_path)
    options: tuple[str, ...]  # reloptions: security_barrier=true, check_option=local ...
    owner: str
    acl: tuple[tuple[str | None, str, bool], ...] | None  # None: the default privileges
    comment: str | None
    column_comments: tuple[tuple[str, str], ...]
    objects: tuple[ViewObject, ...]  # its triggers, then its rules, by name
    indexes: tuple[tuple[str, str, str | None], ...]
    """A materialized view's indexes: name, definition (in its tablespace), comment."""
    populated: bool  # a materialized view's: whether it holds data (REFRESH was run)
    tablespace: str | None  # a materialized view's; None: the database's default

    @property
    def kind(self) -> sql.SQL:
        """How ALTER, COMMENT ON and DROP name it."""
        return sql.SQL("MATERIALIZED VIEW" if self.materialized else "VIEW")


_CHAIN = """
    WITH RECURSIVE chain(oid, depth) AS (
        SELECT r.ev_class, 1
        FROM pg_attribute a
        JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = a.attrelid
             AND d.refobjsubid = a.attnum AND d.classid = 'pg_rewrite'::regclass
        JOIN pg_rewrite r ON r.oid = d.objid
        JOIN pg_class v ON v.oid = r.ev_class AND v.relkind IN ('v', 'm')
        WHERE (a.attrelid, a.attname) IN ({columns}) AND r.ev_class <> a.attrelid
      UNION
        SELECT r.ev_class, c.depth + 1
        FROM chain c
        JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = c.oid
             AND d.classid = 'pg_rewrite'::regclass
        JOIN pg_rewrite r ON r.oid = d.objid
        JOIN pg_class v ON v.oid = r.ev_class AND v.relkind IN ('v', 'm')
        WHERE r.ev_class <> c.oid AND c.depth < 100
    )
"""


def _chain(keys: Iterable[KeyColumn]) -> sql.Composable:
    """``chain(oid, depth)``: the views over any of ``keys``, and over those, at each
    depth they are found."""
    return sql.SQL(_CHAIN).format(columns=sql.SQL(", ").join(
        sql.SQL("(to_regclass({}), {}::name)").format(
            sql.Literal(catalog.regclass(key.table)), sql.Literal(key.column))
        for key in keys))


def signature(keys: Iterable[KeyColumn]) -> sql.Composable:
    """A query of one value that changes when the views over ``keys`` do: which they are,
    and each one's catalog row's version (an ALTER, a GRANT writes a new one).  The swap
    reads the views before its write-blocking locks and asks this under them: a view
    created in between (CREATE VIEW locks nothing its lock stops) makes it read again."""
    return sql.SQL("{} SELECT coalesce(array_agg(c.oid::text || ':' || c.xmin::text "
                   "ORDER BY c.oid), '{{}}') FROM pg_class c "
                   "WHERE c.oid IN (SELECT oid FROM chain)").format(_chain(keys))


def dependent_views(conn: Connection, keys: Iterable[KeyColumn]) -> list[ViewDef]:
    """The views over the columns, and the views over those, innermost first."""
    keys = list(keys)
    if not keys:
        return []
    with conn.cursor() as cur:
        cur.execute(sql.SQL("{} SELECT oid, max(depth) FROM chain GROUP BY oid")
                    .format(_chain(keys)))
        views = [read(cur, oid, depth) for oid, depth in cur.fetchall()]
    return sorted(views, key=lambda view: (view.depth, view.view))


def read(cur: Cursor, oid: int, depth: int = 0) -> ViewDef:
    """The view of that oid as the swap would create it again."""
    cur.execute(
        """
        SELECT n.nspname, c.relname, c.relkind = 'm', pg_get_viewdef(c.oid),
               coalesce(c.reloptions, '{}')::text[], pg_get_userbyid(c.relowner),
               c.relacl IS NULL, obj_description(c.oid, 'pg_class'), c.relispopulated,
               (SELECT spcname FROM pg_tablespace WHERE oid = c.reltablespace)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = %s
        """, (oid,))
    row = cur.fetchone()
    assert row is not None
    (schema, name, materialized, definition, options, owner, default_acl, comment, populated,
     tablespace) = row
    cur.execute(
        """
        SELECT CASE WHEN x.grantee = 0 THEN NULL ELSE pg_get_userbyid(x.grantee) END,
               x.privilege_type, x.is_grantable
        FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) WITH ORDINALITY x
        WHERE c.oid = %s ORDER BY x.ordinality  -- granted again in that order: the same acl
        """, (oid,))
    acl = None if default_acl else tuple(cur.fetchall())
    cur.execute("SELECT attname, col_description(attrelid, attnum) FROM pg_attribute "
                "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped "
                "AND col_description(attrelid, attnum) IS NOT NULL ORDER BY attnum", (oid,))
    column_comments = tuple(cur.fetchall())
    cur.execute(
        """
        SELECT 'TRIGGER', t.tgname, pg_get_triggerdef(t.oid),
               obj_description(t.oid, 'pg_trigger'), p.prosrc
        FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
        WHERE t.tgrelid = %(view)s AND NOT t.tgisinternal
        UNION ALL
        SELECT 'RULE', rulename, pg_get_ruledef(oid), obj_description(oid, 'pg_rewrite'), NULL
        FROM pg_rewrite WHERE ev_class = %(view)s AND rulename <> '_RETURN'
        ORDER BY 1 DESC, 2
        """, {"view": oid})
    objects = tuple(ViewObject(kind, object_name, text.strip().removesuffix(";"), note, source)
                    for kind, object_name, text, note, source in cur.fetchall())
    cur.execute("SELECT c.relname, pg_get_indexdef(i.indexrelid), "
                "obj_description(i.indexrelid, 'pg_class'), "
                "(SELECT spcname FROM pg_tablespace WHERE oid = c.reltablespace) "
                "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE i.indrelid = %s ORDER BY 1", (oid,))
    indexes = tuple((index, sqlexpr.with_tablespace(text, space), note)
                    for index, text, note, space in cur.fetchall())
    return ViewDef(oid, Table(schema, name), materialized, depth,
                   definition.strip().removesuffix(";"), tuple(options), owner, acl, comment,
                   column_comments, objects, indexes, bool(populated), tablespace)


def blockers(conn: Connection, key: KeyColumn, columns: tuple[KeyColumn, ...],
             backup_schema: str, *, refresh: bool) -> list[Blocker]:
    """What the swap cannot carry among the views over ``key``: each named, with why.

    ``columns`` are all the columns the swap changes together: a view may read
    several of them, and is judged with all of them converted.  Materialized
    views are carried only when the operator accepts their refresh after the
    swap (``refresh``).
    """
    views = dependent_views(conn, (key,))
    found = [] if refresh else [Blocker(f"materialized view {view.view}", hint=MATERIALIZED_HINT)
                                for view in views if view.materialized]
    found += _not_carried(conn, views)
    failures = compile_failures(conn, [view for view in views
                                       if refresh or not view.materialized],
                                columns, backup_schema)
    found += [Blocker(f"{'materialized view' if view.materialized else 'view'} {view.view}",
                      failures[view.oid], VIEW_HINT)
              for view in views if view.oid in failures]
    return found


def refuse(conn: Connection, columns: tuple[KeyColumn, ...], backup_schema: str, *,
           refresh: bool) -> None:
    """Refuse (nothing changed) when the swap of ``columns`` could not carry every view
    over them: the rollback after the swap runs no pre-flight, and asks this first."""
    found: dict[str, Blocker] = {}
    for key in columns:
        found.update((blocker.what, blocker)
                     for blocker in blockers(conn, key, columns, backup_schema,
                                             refresh=refresh))
    conn.rollback()
    if found:
        raise MigrationError(
            "refused, nothing was changed: " + "; ".join(
                blocker.what + (f" ({blocker.reason})" if blocker.reason else "")
                for blocker in found.values()),
            hint=" / ".join(dict.fromkeys(blocker.hint for blocker in found.values())))


def _not_carried(conn: Connection, views: list[ViewDef]) -> list[Blocker]:
    """Objects depending on the views other than the views over them, their triggers,
    rules and indexes (which are carried), and views whose owner this role cannot drop
    and create them for."""
    oids = [view.oid for view in views]
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid),
                   d.refobjid::regclass::text
            FROM pg_depend d
            WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = ANY (%(views)s)
              AND d.deptype IN ('n', 'a')
              AND NOT (d.classid = 'pg_rewrite'::regclass AND d.objid IN (
                    SELECT oid FROM pg_rewrite WHERE ev_class = ANY (%(views)s)))
              AND NOT (d.classid = 'pg_trigger'::regclass AND d.objid IN (
                    SELECT oid FROM pg_trigger WHERE tgrelid = ANY (%(views)s)))
              AND NOT (d.classid = 'pg_class'::regclass AND d.objid IN (
                    SELECT indexrelid FROM pg_index WHERE indrelid = ANY (%(views)s)))
              AND NOT (d.classid = 'pg_type'::regclass)
            ORDER BY 1
            """, {"views": oids})
        found = [Blocker(what, f"it depends on view {view}, which the swap drops and "
                         "creates again", DEPENDENT_HINT) for what, view in cur.fetchall()]
        cur.execute("SELECT c.oid::regclass::text, pg_get_userbyid(c.relowner) FROM pg_class c "
                    "WHERE c.oid = ANY (%s) AND NOT pg_has_role(c.relowner, 'MEMBER') "
                    "ORDER BY 1", (oids,))
        found += [Blocker(f"view {view}", f"it is owned by {owner}, for whom this role cannot "
                          "drop and create it", "run the migration as a member of that role, "
                          "or drop the view before and create it again after")
                  for view, owner in cur.fetchall()]
    return found


def _new_type(cur: Cursor, key: KeyColumn, backup_schema: str) -> sql.Composable:
    """The type ``key`` has after the swap: uuid, or on the way back its original string
    type as the backup recorded it (read back by the server as a type name, never run)."""
    if not key.back:
        return sql.SQL("uuid")
    cur.execute("SELECT format_type(to_regtype(%s), NULL)",
                (backup.saved_column(cur, backup_schema, key).type,))
    row = cur.fetchone()
    return sql.SQL(row[0] if row and row[0] else "text")


def compile_failures(conn: Connection, views: list[ViewDef],
                     columns: tuple[KeyColumn, ...], backup_schema: str) -> dict[int, str]:
    """Why each view that would not compile with ``columns`` converted would not, by oid.

    In a savepoint rolled back: an empty temporary twin of each table of
    ``columns`` (same name, in ``pg_temp``: a view's implicit alias stays
    right), with the new types and the primary key (``GROUP BY`` may rely on
    it), then each view as a temporary view over the twins and the views
    before it.
    """
    if not views:
        return {}
    tables = sorted({key.table for key in columns})
    names = [table.name for table in tables] + [view.view.name for view in views]
    if len(set(names)) < len(names):
        return {view.oid: "cannot be judged: two of the tables and views it involves share "
                "a name" for view in views}
    relations = {(relation.schema, relation.name): "pg_temp." + sqlexpr.quote_ident(relation.name)
                 for relation in [*tables, *(view.view for view in views)]}
    failures: dict[int, str] = {}
    with conn.cursor() as cur:
        cur.execute("SAVEPOINT views_oracle")
        try:
            for table in tables:
                twin = sql.Identifier("pg_temp", table.name)
                try:
                    cur.execute(sql.SQL("CREATE TEMPORARY TABLE {} (LIKE {})").format(
                        twin, table.ident))
                except psycopg2.errors.InsufficientPrivilege:
                    return {view.oid: "cannot be judged: this role may not create temporary "
                            "tables, which the check of the views needs (GRANT TEMPORARY ON "
                            "DATABASE ... TO it)" for view in views}
                for key in columns:
                    if key.table == table:
                        cur.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {} USING NULL")
                                    .format(twin, sql.Identifier(key.column),
                                            _new_type(cur, key, backup_schema)))
                primary = catalog.primary_key(conn, table)
                if primary:
                    cur.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
                        twin, sqlexpr.column_list(primary)))
            for view in views:
                failures.update(_compiles(cur, view, relations, failures, views))
        finally:
            cur.execute("ROLLBACK TO SAVEPOINT views_oracle")
            cur.execute("RELEASE SAVEPOINT views_oracle")
    return failures


def _compiles(cur: Cursor, view: ViewDef, relations: dict[tuple[str, str], str],
              failures: dict[int, str], views: list[ViewDef]) -> dict[int, str]:
    """{} when the view compiles over the twins, else {oid: why not}."""
    inner = [other for other in views if other.oid in failures
             and (other.view.schema, other.view.name) in _relations_of(view.definition,
                                                                       relations)]
    if inner:
        return {view.oid: f"it reads view {inner[0].view}, which would not compile"}
    cur.execute("SAVEPOINT view_oracle")
    what = ""
    # A materialized view's twin is an empty table of its query, for its indexes to be
    # built on too.
    twin = "TABLE {} AS {} WITH NO DATA" if view.materialized else "VIEW {} AS {}"
    try:
        cur.execute(sql.SQL("CREATE TEMPORARY " + twin).format(
            sql.Identifier(view.view.name),
            sql.SQL(sqlexpr.replace_relations(view.definition, relations))))
        for found in view.objects:
            what = f"its {found.kind.lower()} {found.name} "
            cur.execute(sql.SQL(sqlexpr.replace_relations(found.definition, relations)))
        for index, definition, _ in view.indexes:
            what = f"its index {index} "
            cur.execute(sql.SQL(sqlexpr.replace_relations(definition, relations)))
    except psycopg2.Error as error:
        cur.execute("ROLLBACK TO SAVEPOINT view_oracle")
        return {view.oid: f"{what}would not compile once the columns have their new types: "
                f"{error.diag.message_primary}"}
    cur.execute("RELEASE SAVEPOINT view_oracle")
    return {}


def _relations_of(definition: str, relations: dict[tuple[str, str], str]) -> set[tuple[str, str]]:
    """Which of ``relations`` the definition names."""
    return {relation for relation in relations
            if sqlexpr.replace_relations(definition, {relation: ""}) != definition}


# --- in the swap's transaction ------------------------------------------------------------

def drop_statements(views: list[ViewDef]) -> list[sql.Composable]:
    """The views dropped, outermost first."""
    return [sql.SQL("DROP {} {}").format(view.kind, view.view.ident) for view in reversed(views)]


def create_statements(views: list[ViewDef], user: str) -> list[sql.Composable]:
    """Each view again as it was read, innermost first, over the renamed columns, as
    ``user`` (the swap's role) creates it; a materialized view empty (``WITH NO DATA``: its
    query is not run under the swap's locks), with its indexes, for
    ``contract.refresh_views`` to fill after the swap."""
    statements: list[sql.Composable] = []
    for view in views:
        statement = sql.SQL("CREATE {} {}").format(view.kind, view.view.ident)
        if view.options:
            statement += sql.SQL(" WITH ({})").format(sql.SQL(", ").join(
                sql.SQL("{} = {}").format(sql.Identifier(name), sql.Literal(value))
                for name, value in (option.split("=", 1) for option in view.options)))
        if view.tablespace is not None:
            statement += sql.SQL(" TABLESPACE {}").format(sql.Identifier(view.tablespace))
        statement += sql.SQL(" AS {}").format(sql.SQL(view.definition))
        statements.append(statement + sql.SQL(" WITH NO DATA" if view.materialized else ""))
        for index, definition, comment in view.indexes:
            statements.append(sql.SQL(definition))
            statements += sqlexpr.comment_on(sql.SQL("INDEX {}").format(
                sql.Identifier(view.view.schema, index)), comment)
        statements += _dress(view, user)
        for found in view.objects:  # the server's own text, read in this transaction
            statements.append(sql.SQL(found.definition))
            statements += sqlexpr.comment_on(sql.SQL("{} {} ON {}").format(
                sql.SQL(found.kind), sql.Identifier(found.name), view.view.ident),
                found.comment)
    return statements


def _dress(view: ViewDef, user: str) -> list[sql.Composable]:
    """Owner, privileges and comments of the view as it was."""
    ident = view.view.ident
    statements: list[sql.Composable] = []
    if user != view.owner:
        statements.append(sql.SQL("ALTER {} {} OWNER TO {}").format(
            view.kind, ident, sql.Identifier(view.owner)))
    if view.acl is not None:
        statements.append(sql.SQL("REVOKE ALL ON {} FROM PUBLIC, {}").format(
            ident, sql.Identifier(view.owner)))
        for grantee, privilege, grantable in view.acl:
            if privilege not in PRIVILEGES:
                raise MigrationError(f"unexpected privilege {privilege!r} on view {view.view}")
            statements.append(sql.SQL("GRANT {} ON {} TO {}{}").format(
                sql.SQL(privilege), ident,
                sql.SQL("PUBLIC") if grantee is None else sql.Identifier(grantee),
                sql.SQL(" WITH GRANT OPTION" if grantable else "")))
    statements += sqlexpr.comment_on(sql.SQL("{} {}").format(view.kind, ident), view.comment)
    for column, text in view.column_comments:
        statements += sqlexpr.comment_on(sql.SQL("COLUMN {}").format(
            sql.Identifier(view.view.schema, view.view.name, column)), text)
    return statements


# --- the materialized views a swap created empty, for the contract to fill -----------------

def pending_table(schema: str) -> sql.Identifier:
    """The backup's record of the materialized views the swap created empty."""
    return sql.Identifier(schema, "pending_refresh")


def to_refresh(views: list[ViewDef]) -> list[ViewDef]:
    """The materialized views among ``views`` that held data: the swap creates them empty,
    and they are to be refreshed after it."""
    return [view for view in views if view.materialized and view.populated]


def mark_pending(cur: Cursor, views: list[ViewDef], backup_schema: str) -> None:
    """Record, in the swap's transaction, the materialized views it created empty that held
    data (``to_refresh``): the record commits with the swap, so a refresh cut short is
    resumed."""
    populated = to_refresh(views)
    if not populated:
        return
    backup.create_private(cur, pending_table(backup_schema),
                          sql.SQL(backup.PENDING_REFRESH).format(pending_table(backup_schema)))
    for view in populated:
        cur.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s) ON CONFLICT DO NOTHING").format(
            pending_table(backup_schema)), (view.view.schema, view.view.name, view.depth))


def left_empty(conn: Connection, backup_schema: str) -> list[Table]:
    """The materialized views a swap created empty and that are not refreshed yet."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL",
                    (pending_table(backup_schema).as_string(cur),))
        if not (cur.fetchone() or [False])[0]:
            return []
        cur.execute(sql.SQL("SELECT view_schema, view_name FROM {} ORDER BY depth, 1, 2")
                    .format(pending_table(backup_schema)))
        return [Table(schema, name) for schema, name in cur.fetchall()]
