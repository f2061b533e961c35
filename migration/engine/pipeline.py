"""The engine's one pipeline, for one plan, either way: expand (fill, proofs, indexes,
foreign keys between the copies, checks), then swap, then contract (statistics,
materialized views).  Here, and only here, is the order of the phases written.

The migration runs it on the plan (``operations.migrate_foreign_keys``); the rollback after
the swap runs it on ``Plan.reversed()`` (``rollback.revert``), the same engine the other
way: they differ only in how the copies are filled, which each passes as ``fill_copies``
(on the way back, the string copies also take their original spellings before they are
proven).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from migration import clients
from migration.engine import contract, expand, fill, parallel, swap
from migration.model import KeyColumn
from migration.plan import Plan
from migration.session import Session


@dataclass(frozen=True)
class Expanded:
    """What the expand built beside the columns."""

    rows: int  # rows filled (and respelled, on the way back: what ``fill_copies`` returned)
    indexes: int
    foreign_keys: int


@dataclass(frozen=True)
class Swapped:
    """The swap's write stall and what ``clients.after_swap`` found."""

    stall_s: float
    sessions: dict[str, Any]


def expand_columns(session: Session, plan: Plan, keys: Sequence[KeyColumn], run_id: int, *,
                   fill_copies: Callable[[], int], references: bool = True) -> Expanded:
    """Expand ``keys`` of ``plan``: ``fill_copies`` (rows), prove each, build each's
    indexes, then (``references``) the copies of the plan's foreign keys, which need both
    sides expanded: ``migrate_users`` expands the parent alone.  Each step resumes where an
    interrupted run left it; with more than one job, the proofs, the index builds and the
    foreign keys' validations of different tables run side by side (``parallel``)."""
    rows = fill_copies()
    parallel.side_by_side(session, [parallel.Unit(key.table, partial(
        fill.prove_filled, key=key, run_id=run_id)) for key in keys])
    indexes = expand.build_all_indexes(session, keys)
    return Expanded(rows, indexes, expand.reference(session, plan) if references else 0)


def swap_and_contract(session: Session, plan: Plan) -> Swapped:
    """Every column of ``plan`` ready, its checks copied (the last of the expand: their
    validation scans run before the swap's locks), then the swap in one short transaction,
    the sessions that connected before it named, then the contract."""
    swap.require_ready(session, plan)
    for key in plan.columns:
        expand.copy_checks(session, key)
    committed = swap.swap(session, plan)
    sessions = clients.after_swap(session)
    contract.contract(session, plan, committed.analyze)
    return Swapped(committed.held_s, sessions)
