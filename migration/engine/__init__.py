"""The engine: the phases that move a plan's key columns to their new type, each as a
file, each with its inverse or discard beside it.  ``pipeline`` runs them in order, either
way: the migration on the plan, the rollback after the swap on ``Plan.reversed()``.

- ``fill``: the copy column, its sync trigger, the fill in keyset batches, its proofs;
- ``expand``: the copies' indexes, checks and foreign keys, a column's ``Stage``, and
  ``discard``, the expand's inverse;
- ``swap``: the one short transaction that puts the columns on their copies;
- ``contract``: what follows the swap (statistics, materialized views) and the
  backup's drop;
- ``rollback``: the way back, ``discard`` before the swap and ``revert`` after it;
- ``pipeline``: the only place the phases' order is written.
"""
