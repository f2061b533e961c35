"""A thread that does a round of work on a connection of its own, every so often."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod

import psycopg2

from migration.connection import Connection, connect


class Poller(ABC):
    """Every ``interval`` seconds, ``_round`` on a connection of its own, until ``stop``.

    An error of a round (its connection lost to a server restart or an administrator's
    ``pg_terminate_backend``, say) is told to ``_failed``, and the next round opens a new
    connection: the watch goes on through what it watches.
    """

    def __init__(self, dsn: str, application_name: str, interval: float, *,
                 autocommit: bool = False) -> None:
        self.dsn, self.interval = dsn, interval
        self._application_name, self._autocommit = application_name, autocommit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=application_name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the rounds; nothing to do when they have ended or never started."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @abstractmethod
    def _round(self, conn: Connection) -> None:
        """One round's work; a ``psycopg2.Error`` it raises ends it as a lost connection."""

    @abstractmethod
    def _failed(self, error: psycopg2.Error) -> None:
        """Record ``error``, which ended a round; the next round opens a new connection."""

    def _run(self) -> None:
        conn: Connection | None = None
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                if conn is None or conn.closed:
                    conn = connect(self.dsn, autocommit=self._autocommit,
                                   application_name=self._application_name)
                self._round(conn)
            except psycopg2.Error as exc:
                self._failed(exc)
                if conn is not None:
                    conn.close()
                conn = None
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - began)))
        if conn is not None:
            conn.close()
