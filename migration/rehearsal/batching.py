"""Which batch sizes a rehearsal times, and which one it keeps.

A batch size at least as large as a table does the table in one batch: any
larger size runs the same statements, so timing it measures noise.  Each size
tried is timed ``REPEATS`` times; a size is kept as the faster only when it
beats the others by more than the noise, else the default (or the smallest of
the sizes within noise) is kept: smaller batches hold their row locks for
less time, and the application waits less behind them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DEFAULT_BATCH_SIZE = 1000
REPEATS = 2
NOISE_FLOOR = 0.10
"""The least noise assumed, as a share of the best time: two repeats understate it (issue 14
named 0.28 s against 0.30 s, 7 %, a choice made from noise), and a gain smaller than
this is not worth the longer row locks of a larger batch."""


def sizes_to_try(sizes: Sequence[int], rows: Mapping[str, int]) -> tuple[list[int], list[str]]:
    """The sizes smaller than the largest table, and why each other one is skipped.

    When none is smaller, the smallest is kept: one size is timed in any case.
    """
    table, largest = max(rows.items(), key=lambda item: item[1])
    tried = [size for size in sizes if size < largest] or [min(sizes)]
    skipped = [f"{size:,}: not smaller than the largest table ({table}, {largest:,} rows), "
               "which it would do in one batch like any larger size"
               for size in sizes if size not in tried]
    return tried, skipped


@dataclass(frozen=True)
class Choice:
    batch_size: int
    reason: str
    tied: tuple[int, ...]
    """The sizes within noise of the fastest (itself included); one size: a clear winner."""


def choose(times: Mapping[int, Sequence[float]]) -> Choice:
    """The batch size to keep, from each size's repeated times (failed sizes left out).

    The noise between two sizes is the larger spread of their repeats, and at
    least ``NOISE_FLOOR`` of the best mean.
    """
    means = {size: sum(t) / len(t) for size, t in times.items()}
    spread = {size: max(t) - min(t) for size, t in times.items()}
    best = min(means, key=lambda size: (means[size], size))

    def noise(size: int) -> float:
        return max(spread[best], spread[size], NOISE_FLOOR * means[best])

    tied = tuple(sorted(size for size in means if means[size] - means[best] <= noise(size)))
    if len(tied) == 1:
        if len(means) == 1:
            return Choice(best, f"{best:,}: the only size timed", tied)
        runner = min((s for s in means if s != best), key=lambda s: means[s])
        return Choice(best, f"{best:,} is the fastest: {means[best]:.2f} s against "
                      f"{means[runner]:.2f} s for {runner:,}, more than the noise "
                      f"({noise(runner):.2f} s)", tied)
    kept = DEFAULT_BATCH_SIZE if DEFAULT_BATCH_SIZE in tied else min(tied)
    others = ", ".join(f"{size:,} {means[size]:.2f} s" for size in tied)
    why = "the default" if kept == DEFAULT_BATCH_SIZE else "the smallest of them"
    return Choice(kept, f"no size is faster beyond noise ({others}; noise "
                  f"{max(noise(size) for size in tied):.2f} s): kept {kept:,}, {why}", tied)
