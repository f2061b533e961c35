"""The rehearsal's projection for production: a fit over several rehearsal sizes, as a range.

One rehearsal size cannot tell a step's fixed cost (connections, catalog
work, the swap, index builds' start-up) from its cost per row: dividing its
time by its rows charges the fixed cost to every row, so a small rehearsal
projects more than a large one for the same production size.  The final
migration is therefore timed at several sizes (``SIZES``), and each step is
fit as ``t = overhead + per_row * rows`` by least squares.

The range is the fit's cost per row plus or minus its standard error, from
the residuals of the fit (``slope_error``), applied to the production rows
after the fit's overhead.  Why the residual and not the per-size rates:
least squares weighs each size by its distance from the others, so the
largest size counts most, while the rate between two small neighbouring
sizes is mostly noise (their rows differ little); on a loaded machine such
rates went to zero and gave "16 s to 15 min" for a 2,000-user rehearsal.  A
per-row cost that grows with size (a table outgrowing the cache) leaves
residuals too, and widens the range.  Timings exactly linear in rows give a
range of one value, whatever the rehearsal's size; so do two sizes, which
leave no residual: the rehearsal times three.

The write stall is projected apart from the total: it is the time the
swap's transaction holds the lock that blocks the application's writes
(recorded by the engine in migrate_foreign_keys' log details), catalog work
that does not grow with rows; its range is the lowest and highest measured.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from math import sqrt
from typing import Protocol

from migration import catalog
from migration.connection import connected
from migration.plan import Plan

SIZES = (1, 3, 9)
"""The rehearsal's users divided by each of these: the sizes its final migration is timed at
(the two smaller ones cost 4/9 of the full one, on datasets of their own)."""


@dataclass(frozen=True)
class Line:
    """``seconds = overhead + per_row * rows``."""

    overhead: float
    per_row: float

    def at(self, rows: int, per_row: float | None = None) -> float:
        return self.overhead + (self.per_row if per_row is None else per_row) * rows


def fit(points: Sequence[tuple[int, float]]) -> Line:
    """The least-squares line through ``(rows, seconds)`` points of at least two sizes.

    Neither part may be negative: a negative overhead (noise at small sizes)
    refits through the origin, a negative per-row cost keeps the mean time as
    overhead.
    """
    if len({rows for rows, _ in points}) < 2:
        raise ValueError("a fit needs timings at two sizes at least")
    n = len(points)
    mean_rows = sum(r for r, _ in points) / n
    mean_seconds = sum(s for _, s in points) / n
    sxx = sum((r - mean_rows) ** 2 for r, _ in points)
    per_row = sum((r - mean_rows) * (s - mean_seconds) for r, s in points) / sxx
    if per_row <= 0:
        return Line(mean_seconds, 0.0)
    overhead = mean_seconds - per_row * mean_rows
    if overhead < 0:
        return Line(0.0, sum(r * s for r, s in points) / sum(r * r for r, _ in points))
    return Line(overhead, per_row)


def slope_error(points: Sequence[tuple[int, float]], line: Line) -> float:
    """The standard error of ``line``'s cost per row, from its residuals over ``points``
    (zero with fewer than three points: a line through two leaves no residual)."""
    if len(points) < 3:
        return 0.0
    mean_rows = sum(r for r, _ in points) / len(points)
    residuals = sum((s - line.at(r)) ** 2 for r, s in points)
    return sqrt(residuals / (len(points) - 2) / sum((r - mean_rows) ** 2 for r, _ in points))


@dataclass(frozen=True)
class StepProjection:
    step: str
    rows: int
    """Production rows of the tables the step works through."""
    line: Line
    low: float
    high: float


def project_step(step: str, points: Sequence[tuple[int, float]], rows: int) -> StepProjection:
    """One step's time for ``rows``: the fit's overhead plus its cost per row, less and more
    its standard error (never below zero)."""
    line = fit(points)
    error = slope_error(points, line)
    return StepProjection(step, rows, line, line.at(rows, max(line.per_row - error, 0.0)),
                          line.at(rows, line.per_row + error))


@dataclass(frozen=True)
class Projection:
    rows: Mapping[str, int]
    """Production rows per table."""
    source: str
    """Where the production rows come from (--production-rows, or a database's catalog)."""
    sizes: tuple[int, ...]
    """The rehearsal sizes (users) the fit is over."""
    steps: tuple[StepProjection, ...]
    stall: tuple[float, float] | None
    """Seconds the application's writes wait for the swap, lowest and highest measured;
    None when no swap was timed."""

    @property
    def low(self) -> float:
        return sum(step.low for step in self.steps)

    @property
    def high(self) -> float:
        return sum(step.high for step in self.steps)


class Timed(Protocol):
    """One step of one timed migration (a ``report.StepTiming``)."""

    @property
    def step(self) -> str: ...
    @property
    def seconds(self) -> float: ...
    @property
    def rows(self) -> int: ...
    @property
    def tables(self) -> tuple[str, ...]: ...


def project(timings: Iterable[Timed], production: Mapping[str, int], *,
            users: Iterable[int], source: str, stalls: Sequence[float]) -> Projection:
    """Each step fit over its timings at the rehearsal's sizes (``users``), projected for the
    ``production`` rows of its tables."""
    points: dict[str, list[tuple[int, float]]] = {}
    tables: dict[str, tuple[str, ...]] = {}
    for timing in timings:
        points.setdefault(timing.step, []).append((timing.rows, timing.seconds))
        tables[timing.step] = timing.tables
    steps = tuple(project_step(step, found, sum(production[t] for t in tables[step]))
                  for step, found in points.items())
    return Projection(dict(production), source, tuple(sorted(set(users), reverse=True)), steps,
                      (min(stalls), max(stalls)) if stalls else None)


def table_sizes(dsn: str, plan: Plan) -> dict[str, int]:
    """Rows of each table of ``plan`` in the database at ``dsn``: the planner's estimates,
    counted where a table was never analyzed (``catalog.estimated_rows``).  Read only."""
    with connected(dsn, autocommit=True) as conn:
        return {table.name: catalog.estimated_rows(conn, table) for table in plan.tables}
