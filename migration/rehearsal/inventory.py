"""What depends on the plan's key columns, and whether the migration carries it or refuses it.

For a rehearsal's report on a schema the project did not design: the reader
wants to see, before production, that its indexes, constraints, foreign keys,
policies, triggers and publications come through, and which objects stop the
migration and why.  Nothing is judged here: the carried objects are those the
catalog functions the engine itself uses find (``catalog.indexes_on``,
``foreign_keys_to``, ``check_constraints_on``, ``policies_on``,
``application_triggers``, ``views.dependent_views``, the recorded
publications), the refused ones are
validate_schema's findings about objects (``preflight.blockers`` and the
trigger, rule and table-family checks), with their reasons and hints.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from migration import catalog, recorded, views
from migration.connection import Connection
from migration.plan import Plan
from migration.preflight import mentions
from migration.report import Finding, Status

# validate_schema's checks that are about objects, not rows.
OBJECT_CHECKS = ("blocker", "trigger_fires", "trigger_uses_key", "rule_fires", "table_family",
                 "name_taken")


@dataclass(frozen=True)
class Dependent:
    """An object that depends on a key column of the plan."""

    column: str  # the key column, schema.table.column
    what: str  # "index idx_user_email", "foreign key fk_x on public.credential", ...
    carried: bool
    how: str  # how the migration carries it, or why it is refused and what to do


def _carried(column: str, what: str, how: str) -> Dependent:
    return Dependent(column, what, carried=True, how=how)


def carried_objects(conn: Connection, plan: Plan) -> list[Dependent]:
    """The objects on the plan's columns that the migration carries, and how."""
    found: list[Dependent] = []
    for key in plan.columns:
        column = str(key)
        for index in catalog.indexes_on(conn, key):
            kind = {"p": "primary key", "u": "unique constraint"}.get(
                index.constraint_type or "", "index")
            found.append(_carried(column, f"{kind} {index.name} on {index.table}",
                                  "built again on the uuid copy (CONCURRENTLY), takes its "
                                  "name at the swap"))
        if key == plan.parent:
            found += [_carried(column, f"foreign key {fk.name} on {fk.table} ({fk.column})",
                               "copied between the uuid copies (NOT VALID, then VALIDATE); "
                               "the old one holds until the swap")
                      for fk in catalog.foreign_keys_to(conn, key)]
        found += [_carried(column, f"constraint {check.name} (CHECK {check.expression})",
                           "compiles on uuid: copied beside the column, validated, renamed "
                           "at the swap") for check in catalog.check_constraints_on(conn, key)]
        found += [_carried(column, f"policy {policy.name} on {policy.table}",
                           "compiles on uuid: created again inside the swap's transaction")
                  for policy in catalog.policies_on(conn, key)]
        named = {trigger.name for trigger in catalog.column_triggers(conn, key)}
        found += [_carried(column, str(trigger),
                           ("its WHEN or column list names the column: created again on the "
                            "uuid column in the swap" if trigger.name in named else "kept as "
                            "it is") + "; its body does not name the column (the smoke writes "
                           "fire it on uuid)")
                  for trigger in catalog.application_triggers(conn, key)
                  if not mentions(trigger.source, key.column)]
        found += [_carried(column, f"view {view.view}", "compiles on uuid: created again "
                           "inside the swap's transaction, with its options, grants, "
                           "comments, triggers and rules")
                  for view in views.dependent_views(conn, (key,))
                  if not view.materialized]
        found += [_carried(column, f"materialized view {view.view}", "with "
                           "--refresh-materialized-views: created again empty inside the "
                           "swap's transaction, with its indexes, and refreshed right after")
                  for view in views.dependent_views(conn, (key,)) if view.materialized]
    with conn.cursor() as cur:
        found += [_carried(entry["table"], f"publication {entry['publication']}",
                           "membership kept (verify compares it with the backup's record)")
                  for entry in recorded.PUBLICATIONS.read(cur, plan)]
    return list(dict.fromkeys(found))


def refused_objects(findings: Sequence[Finding]) -> list[Dependent]:
    """validate_schema's refusals of objects, with the reason and what to do."""
    return [Dependent(f.subject, f.message, carried=False, how=f.hint) for f in findings
            if f.check in OBJECT_CHECKS and f.status in (Status.FAIL, Status.WARN)]


def inventory(conn: Connection, plan: Plan, findings: Sequence[Finding]) -> list[Dependent]:
    """Every object depending on the plan's columns: carried ones first, then the refused."""
    refused = refused_objects(findings)
    carried = [d for d in carried_objects(conn, plan)
               if not any(_names(r.what, d) for r in refused)]
    return carried + refused


def _names(message: str, dependent: Dependent) -> bool:
    """Whether a refusal's message is about ``dependent`` (its kind and name, as words):
    a policy or CHECK that would not compile is found by both lists, and is refused."""
    kind, name = dependent.what.split()[:2] if not dependent.what.startswith(
        ("primary key", "unique constraint", "foreign key", "materialized view")) \
        else dependent.what.split()[1:3]
    return re.search(rf"(?<![\w$]){re.escape(kind)} {re.escape(name)}(?![\w$])",
                     message) is not None
