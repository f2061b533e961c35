"""The benchmark: downtime, lock time, scale and memory of the migration, against the
one-shot ``ALTER COLUMN ... TYPE uuid`` rewrite and the runbook's naive batched loop,
measured in the same run on identical copies of the data.

``python bench/run.py --help`` (or ``tox -e bench``) runs it; ``bench.run`` holds the
orchestration, ``bench.methods`` the two reference methods, ``bench.probe`` the
measuring instruments (lock sampler, WAL, sizes, data digest, child-process memory).
"""
