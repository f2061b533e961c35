"""The rewrites of the server's deparsed text that the engine builds statements from."""

from __future__ import annotations

import pytest

from migration.sqlexpr import with_tablespace

PLAIN = "CREATE INDEX CONCURRENTLY c ON public.t USING btree (user_id) INCLUDE (x)"
PARTIAL = ("CREATE INDEX CONCURRENTLY c ON public.t USING btree (\"where\", lower('WHERE'))"
           " WITH (fillfactor='90') WHERE ((note)::text <> 'WHERE'::text)")


@pytest.mark.parametrize(("statement", "tablespace", "expected"), [
    (PLAIN, None, PLAIN),
    (PLAIN, "fast", PLAIN + ' TABLESPACE "fast"'),
    (PARTIAL, "Fast Disks", PARTIAL.replace(
        " WHERE ((", ' TABLESPACE "Fast Disks" WHERE ((')),
])
def test_the_tablespace_goes_before_a_partial_index_s_where(
        statement: str, tablespace: str | None, expected: str) -> None:
    """Before the predicate, never inside a name, a literal or parentheses."""
    assert with_tablespace(statement, tablespace) == expected
