"""Databases holding the legacy schema, cloned from templates: for tests, rehearsal, benchmark.

A sandbox has a superuser connection (to create roles and databases) kept
apart from the ordinary role that owns the tables, which is what the
migration itself connects as, exactly as in production.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

from psycopg2 import sql

from migration.connection import connect

OWNER_ROLE = "app_owner"
SCHEMA_FILES = {
    "legacy": ("legacy_schema.sql",),
    "legacy_no_fk": ("legacy_schema.sql", "variant_no_fk.sql"),
}


def schema_sql(variant: str) -> str:
    """The SQL text that builds a schema variant."""
    files = resources.files("migration.fixtures")
    return "\n".join(files.joinpath(name).read_text() for name in SCHEMA_FILES[variant])


def with_credentials(dsn: str, *, user: str, password: str, dbname: str) -> str:
    """The same server URL for another role and database."""
    parts = urlsplit(dsn)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{user}:{password}@{host}:{parts.port or 5432}"
    return urlunsplit((parts.scheme, netloc, "/" + dbname, parts.query, ""))


@dataclass
class Sandbox:
    """A server prepared with an owner role and one template database per variant."""

    admin_dsn: str = field(repr=False)
    owner_password: str = field(repr=False)
    prefix: str

    def owner_dsn(self, dbname: str) -> str:
        return with_credentials(
            self.admin_dsn, user=OWNER_ROLE, password=self.owner_password, dbname=dbname
        )

    def admin_dsn_for(self, dbname: str) -> str:
        parts = urlsplit(self.admin_dsn)
        return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, ""))

    def template(self, variant: str) -> str:
        return f"{self.prefix}_tpl_{variant}"

    def admin_execute(self, statement: sql.Composable) -> None:
        """Run one statement as the superuser, outside any transaction."""
        conn = connect(self.admin_dsn, autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()

    def create_database(self, name: str, *, variant: str | None = "legacy") -> str:
        """A new database owned by the owner role; a clone of a variant's template."""
        return self.clone("template0" if variant is None else self.template(variant), name)

    def clone(self, source: str, name: str) -> str:
        """A copy of database ``source`` (nobody may be connected to it); the owner's DSN."""
        self.admin_execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {}").format(
            sql.Identifier(name), sql.Identifier(source), sql.Identifier(OWNER_ROLE)))
        return self.owner_dsn(name)

    def drop_database(self, name: str) -> None:
        self.admin_execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))

    @contextmanager
    def database(self, name: str, *, variant: str | None = "legacy") -> Iterator[str]:
        """A fresh database for a with-block; yields the owner's DSN."""
        dsn = self.create_database(name, variant=variant)
        try:
            yield dsn
        finally:
            self.drop_database(name)


def prepare(admin_dsn: str, *, prefix: str = "uuidmig") -> Sandbox:
    """Create the owner role and a template database per schema variant.

    The owner is an ordinary role (no superuser, no CREATEDB): it owns its
    databases, hence may create schemas in them, like a production app owner.
    """
    box = Sandbox(admin_dsn=admin_dsn, owner_password=secrets.token_urlsafe(12), prefix=prefix)
    box.admin_execute(sql.SQL(
        "DO $$BEGIN CREATE ROLE {role}; EXCEPTION WHEN duplicate_object THEN NULL; END$$;"
        "ALTER ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {pw}"
    ).format(role=sql.Identifier(OWNER_ROLE), pw=sql.Literal(box.owner_password)))
    for variant in SCHEMA_FILES:
        template = box.template(variant)
        box.drop_database(template)
        box.create_database(template, variant=None)
        owner = connect(box.owner_dsn(template), autocommit=True)
        try:
            with owner.cursor() as cur:
                cur.execute(schema_sql(variant))
        finally:
            owner.close()
    return box
