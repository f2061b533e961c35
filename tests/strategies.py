"""Hypothesis strategies for the suite: the one place they live.

UUID spellings are built from a drawn 128-bit value following PostgreSQL's own
input rule (``string_to_uuid`` in src/backend/utils/adt/uuid.c): optional
braces around 32 hex digits of either case, with at most one hyphen after any
group of four digits but the last, and nothing else, not even whitespace.
Invalid ids are valid ones broken on purpose, one named way each.  Python's
``uuid.UUID`` is no oracle: it takes ``urn:uuid:`` prefixes and hyphens
anywhere, which PostgreSQL rejects.

The legacy keys are VARCHAR(36): a longer string is refused on insert, unless
the excess is spaces, which are silently cut off (so ``'<uuid> '`` would be
stored as a valid id).  Spellings and mutations therefore take a
``max_length``, and datasets only use strings of at most 36 characters.
"""

from __future__ import annotations

import string
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from functools import cache
from typing import Any, NamedTuple

from hypothesis import strategies as st

KEY_LENGTH = 36
"""Length of the legacy VARCHAR(36) keys."""

HEX_DIGITS = 32
HYPHEN_SLOTS = tuple(range(4, HEX_DIGITS, 4))
"""Where PostgreSQL takes a hyphen: after digit 4, 8, ..., 28 (one at each, all optional)."""
WRONG_SLOTS = tuple(slot for slot in range(HEX_DIGITS + 1) if slot not in HYPHEN_SLOTS)
CANONICAL_SLOTS = (8, 12, 16, 20)
ALL_UPPER = 2**HEX_DIGITS - 1

UUID_BITS = st.integers(min_value=0, max_value=2**128 - 1)

# name -> (hyphen slots, braces, upper-case mask; None: drawn)
_PRESETS: dict[str, tuple[tuple[int, ...], bool, int | None]] = {
    "canonical": (CANONICAL_SLOTS, False, 0),
    "upper": (CANONICAL_SLOTS, False, ALL_UPPER),
    "mixed": (CANONICAL_SLOTS, False, None),
    "braced": (CANONICAL_SLOTS, True, 0),
    "hex32": ((), False, 0),
    "hyphen4": (HYPHEN_SLOTS, False, 0),
    "braced_hex32": ((), True, 0),
}
SPELLINGS = (*_PRESETS, "some_hyphens")
"""Accepted spellings; ``some_hyphens`` puts hyphens at a drawn subset of the slots."""
_SPELLING_LENGTH = {
    **{name: HEX_DIGITS + len(slots) + 2 * braces for name, (slots, braces, _) in _PRESETS.items()},
    "some_hyphens": HEX_DIGITS,
}

# Mutations and the shortest max_length each needs.
_MUTATION_LENGTH = {
    "empty": 0,
    "too_short": HEX_DIGITS,
    "too_long": HEX_DIGITS + 1,
    "non_hex": HEX_DIGITS,
    "whitespace": HEX_DIGITS + 1,
    "urn_prefix": HEX_DIGITS + len("urn:uuid:"),
    "unbalanced_brace": HEX_DIGITS + 1,
    "double_hyphen": HEX_DIGITS + 2,
    "misplaced_hyphen": HEX_DIGITS + 1,
}
MUTATIONS = tuple(_MUTATION_LENGTH)
_UNBOUNDED = 64
"""The length limit when none is given: room for every spelling plus a few characters."""

_WHITESPACE = st.sampled_from(" \t\n\r\v\f\u00a0\u2003\u3000")
_NON_HEX = st.characters(codec="utf-8", exclude_characters="\x00" + string.hexdigits)


def _fitting(
    names: Iterable[str], lengths: Mapping[str, int], max_length: int | None
) -> tuple[str, ...]:
    names = tuple(names)
    unknown = set(names) - lengths.keys()
    if unknown:
        raise ValueError(f"unknown: {sorted(unknown)}; choose from {sorted(lengths)}")
    fit = tuple(name for name in names if max_length is None or lengths[name] <= max_length)
    if not fit:
        raise ValueError(f"none of {names} fits in {max_length} characters")
    return fit


STORABLE_SPELLINGS = _fitting(SPELLINGS, _SPELLING_LENGTH, KEY_LENGTH)
"""The spellings that fit a VARCHAR(36) key."""


def spell(
    value: int, *, hyphens: Iterable[int] = CANONICAL_SLOTS, braces: bool = False, upper: int = 0
) -> str:
    """Write a 128-bit value in hex.

    ``hyphens`` lists slots, a hyphen after that many digits (a repeated slot
    gives a doubled hyphen); bit i of ``upper`` capitalises digit i.
    """
    chars = [c.upper() if upper >> i & 1 else c for i, c in enumerate(f"{value:032x}")]
    for slot in sorted(hyphens, reverse=True):
        chars.insert(slot, "-")
    text = "".join(chars)
    return f"{{{text}}}" if braces else text


_MASKS = st.integers(0, ALL_UPPER)


@cache
def _spelling_names(spellings: tuple[str, ...], max_length: int) -> st.SearchStrategy[str]:
    return st.sampled_from(_fitting(spellings, _SPELLING_LENGTH, max_length))


@cache
def _hyphen_subsets(room: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.sampled_from(HYPHEN_SLOTS), max_size=min(len(HYPHEN_SLOTS), room),
                    unique=True)


def _spelled(draw: st.DrawFn, value: int, spellings: Iterable[str], max_length: int) -> str:
    """``value`` in one of ``spellings`` that fits ``max_length`` (a helper for composites)."""
    name = draw(_spelling_names(tuple(spellings), max_length))
    if name == "some_hyphens":
        some = draw(_hyphen_subsets(max_length - HEX_DIGITS))
        return spell(value, hyphens=some, upper=draw(_MASKS))
    slots, braces, upper = _PRESETS[name]
    if upper is None:
        upper = draw(_MASKS)
    return spell(value, hyphens=slots, braces=braces, upper=upper)


@st.composite
def _uuid_texts(draw: st.DrawFn, spellings: tuple[str, ...], max_length: int) -> str:
    return _spelled(draw, draw(UUID_BITS), spellings, max_length)


def uuid_texts(
    *, spellings: Collection[str] = SPELLINGS, max_length: int | None = None
) -> st.SearchStrategy[str]:
    """Strings PostgreSQL's uuid input accepts, in the given spellings."""
    _fitting(spellings, _SPELLING_LENGTH, max_length)
    return _uuid_texts(tuple(spellings), _UNBOUNDED if max_length is None else max_length)


@st.composite
def _mutated(draw: st.DrawFn, kind: str, value: int, limit: int) -> str:
    """``value`` spelled validly, then broken the ``kind`` way, in at most ``limit`` chars."""

    def base(room: int, spellings: Collection[str] = SPELLINGS) -> str:
        return _spelled(draw, value, spellings, room)

    def digits_of(text: str) -> list[int]:
        return [i for i, c in enumerate(text) if c in string.hexdigits]

    match kind:
        case "empty":
            return ""
        case "too_short":
            text = base(limit)
            gone = draw(st.lists(st.sampled_from(digits_of(text)), min_size=1,
                                 max_size=HEX_DIGITS - 1, unique=True))
            return "".join(c for i, c in enumerate(text) if i not in gone)
        case "too_long":
            text = base(limit - 1)
            extra = draw(st.lists(st.tuples(st.integers(0, len(text)), st.sampled_from("0fAF9")),
                                  min_size=1, max_size=min(4, limit - len(text))))
            for at, digit in sorted(extra, reverse=True):
                text = text[:at] + digit + text[at:]
            return text
        case "non_hex":
            text = base(limit)
            at = draw(st.sampled_from(digits_of(text)))
            return text[:at] + draw(_NON_HEX) + text[at + 1:]
        case "whitespace":
            text = base(limit - 1)
            room = min(3, limit - len(text))
            lead = draw(st.text(_WHITESPACE, max_size=room - 1))
            trail = draw(st.text(_WHITESPACE, min_size=0 if lead else 1, max_size=room - len(lead)))
            return lead + text + trail
        case "urn_prefix":
            return "urn:uuid:" + base(limit - len("urn:uuid:"))
        case "unbalanced_brace":
            text = base(limit - 1, [name for name in SPELLINGS if "braced" not in name])
            return draw(st.sampled_from(["{" + text, text + "}"]))
        case "double_hyphen":
            slots = draw(st.lists(st.sampled_from(HYPHEN_SLOTS), min_size=1,
                                  max_size=min(len(HYPHEN_SLOTS), limit - HEX_DIGITS - 1),
                                  unique=True))
            return spell(value, hyphens=[*slots, draw(st.sampled_from(slots))], upper=draw(_MASKS))
        case "misplaced_hyphen":
            room = min(8, limit - HEX_DIGITS)
            wrong = draw(st.lists(st.sampled_from(WRONG_SLOTS), min_size=1, max_size=room,
                                  unique=True))
            right = draw(st.lists(st.sampled_from(HYPHEN_SLOTS), max_size=room - len(wrong),
                                  unique=True))
            return spell(value, hyphens=[*right, *wrong], upper=draw(_MASKS))
    raise AssertionError(kind)


def invalid_uuid_texts(
    *, kinds: Collection[str] = MUTATIONS, max_length: int | None = None
) -> st.SearchStrategy[str]:
    """Strings PostgreSQL's uuid input rejects: a valid id broken in one of ``kinds``.

    With ``max_length``, kinds that cannot fit (``urn_prefix`` in 36) are left out.
    """
    fit = _fitting(kinds, _MUTATION_LENGTH, max_length)
    limit = _UNBOUNDED if max_length is None else max_length
    return st.tuples(st.sampled_from(fit), UUID_BITS).flatmap(
        lambda drawn: _mutated(drawn[0], drawn[1], limit))


def uuid_candidates(*, max_length: int | None = None) -> st.SearchStrategy[tuple[str, bool]]:
    """(text, whether PostgreSQL should accept it as a uuid)."""
    return st.one_of(
        uuid_texts(max_length=max_length).map(lambda text: (text, True)),
        invalid_uuid_texts(max_length=max_length).map(lambda text: (text, False)),
    )


# ---------------------------------------------------------------- datasets

Json = Any
"""A JSON value as json.loads returns it."""


@dataclass(frozen=True)
class User:
    id: str
    email: str
    display_name: str | None
    is_active: bool
    created_at: datetime


@dataclass(frozen=True)
class JournalEntry:
    id: str
    user_id: str
    title: str
    body: str | None
    mood: int | None
    created_at: datetime


@dataclass(frozen=True)
class Tag:
    id: str
    user_id: str
    name: str
    color: str | None


@dataclass(frozen=True)
class Reminder:
    id: str
    user_id: str | None
    remind_at: datetime
    note: str | None
    payload: dict[str, Json] | None
    done: bool


Row = User | JournalEntry | Tag | Reminder


class Ref(NamedTuple):
    """Where a planted value sits: the row's table and primary key, the column, the value."""

    table: str
    column: str
    pk: str
    value: str


@dataclass(frozen=True)
class Planted:
    """The dirt a dataset holds, as generated; empty sets for a clean dataset."""

    invalid_ids: frozenset[Ref] = frozenset()
    """Every occurrence of an invalid user id: users.id and children's user_id."""
    collisions: frozenset[tuple[str, str]] = frozenset()
    """Pairs of users.id (sorted) that spell the same UUID."""
    orphans: frozenset[Ref] = frozenset()
    """Children whose user_id is a valid UUID that no user has, in any spelling."""
    respelled: frozenset[Ref] = frozenset()
    """Children whose user_id spells an existing user's UUID differently."""
    null_user_ids: frozenset[str] = frozenset()
    """Ids of reminders whose user_id is NULL (legitimate data, not dirt)."""


@dataclass(frozen=True)
class Dataset:
    """Rows for the legacy tables, and what was planted among them."""

    users: tuple[User, ...]
    journal_entries: tuple[JournalEntry, ...]
    tags: tuple[Tag, ...]
    reminders: tuple[Reminder, ...]
    planted: Planted = field(default_factory=Planted)

    def tables(self) -> dict[str, tuple[Row, ...]]:
        """Table name -> rows, parents before children."""
        return {"users": self.users, "journal_entries": self.journal_entries,
                "tags": self.tags, "reminders": self.reminders}


_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
_MAYBE_TEXT = st.none() | _TEXT
_MOMENTS = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1),
    timezones=st.just(UTC) | st.integers(-14 * 60, 14 * 60).map(
        lambda minutes: timezone(timedelta(minutes=minutes))),
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)
_PAYLOADS = st.none() | st.dictionaries(_TEXT, _JSON, max_size=4)
_COLORS = st.none() | st.integers(0, 0xFFFFFF).map("#{:06x}".format)
_TAG_NAMES = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=64)


@dataclass(frozen=True)
class _Knobs:
    max_users: int
    max_children: dict[str, int]
    spellings: tuple[str, ...]
    invalid_ids: bool
    collisions: bool
    orphans: bool
    respelled_children: bool
    null_user_ids: bool | None


def datasets(
    *,
    max_users: int = 5,
    max_entries: int = 8,
    max_tags: int = 8,
    max_reminders: int = 8,
    spellings: Collection[str] = STORABLE_SPELLINGS,
    clean: bool = True,
    foreign_keys: bool = True,
    invalid_ids: bool | None = None,
    collisions: bool | None = None,
    orphans: bool | None = None,
    respelled_children: bool | None = None,
    null_user_ids: bool | None = None,
) -> st.SearchStrategy[Dataset]:
    """Datasets for the legacy schema.

    Clean (the default): every key a valid UUID in one of ``spellings``, no
    two users spelling the same UUID, every child pointing at a user by the
    exact string.  ``clean=False`` plants every kind of dirt that is loadable:
    ``foreign_keys`` says whether tags and reminders have their foreign keys
    (the ``legacy`` variant) or not (``legacy_no_fk``), and orphans and
    respelled children can only live where they have none.  A dirt flag set
    to True plants at least one of its kind (and needs ``clean=False``), False
    none.  ``null_user_ids``: None lets NULL reminder owners occur, True
    plants at least one, False forbids them.  ``max_users`` counts the clean
    users; planted collisions and invalid ids add up to two and three more.
    """

    flags = {"invalid_ids": invalid_ids, "collisions": collisions, "orphans": orphans,
             "respelled_children": respelled_children}

    def dirt(name: str, *, loadable: bool = True) -> bool:
        flag = flags[name]
        if flag is None:
            return not clean and loadable
        if flag and clean:
            raise ValueError(f"{name}=True plants dirt: pass clean=False")
        if flag and not loadable:
            raise ValueError(f"{name}=True cannot be loaded into tables with foreign keys: "
                             "pass foreign_keys=False")
        return flag

    return _datasets(_Knobs(
        max_users=max_users,
        max_children={"journal_entries": max_entries, "tags": max_tags,
                      "reminders": max_reminders},
        spellings=_fitting(spellings, _SPELLING_LENGTH, KEY_LENGTH),
        invalid_ids=dirt("invalid_ids"),
        collisions=dirt("collisions"),
        orphans=dirt("orphans", loadable=not foreign_keys),
        respelled_children=dirt("respelled_children", loadable=not foreign_keys),
        null_user_ids=null_user_ids,
    ))


@dataclass(frozen=True)
class _Link:
    """A child's pointer: its key, its user_id, and the UUID (or invalid id) it means."""

    pk: str
    user_id: str | None
    owner: int | str

    @property
    def parent(self) -> str:
        assert self.user_id is not None, "only reminders may have no user"
        return self.user_id


@st.composite
def _datasets(draw: st.DrawFn, knobs: _Knobs) -> Dataset:
    def respelling(value: int, taken: Collection[str]) -> str:
        """Another spelling of ``value``: one not ``taken`` (there are at least three)."""
        text = _spelled(draw, value, STORABLE_SPELLINGS, KEY_LENGTH)
        if text in taken:
            others = {spell(value, hyphens=slots, braces=braces)
                      for slots, braces in ((CANONICAL_SLOTS, False), ((), False), ((), True))}
            text = draw(st.sampled_from(sorted(others.difference(taken))))
        return text

    # Parents first.  owner: user id -> the UUID it spells, or itself if invalid.
    needs_user = knobs.collisions or knobs.respelled_children
    values = draw(st.lists(UUID_BITS, min_size=int(needs_user),
                           max_size=max(knobs.max_users, int(needs_user)), unique=True))
    owner: dict[str, int | str] = {
        _spelled(draw, value, knobs.spellings, KEY_LENGTH): value for value in values}
    collisions = set()
    if knobs.collisions:
        for value in draw(st.lists(st.sampled_from(values), min_size=1, max_size=2, unique=True)):
            original = next(text for text, owned in owner.items() if owned == value)
            twin = respelling(value, owner)
            owner[twin] = value
            collisions.add((min(original, twin), max(original, twin)))
    invalid: set[str] = set()
    if knobs.invalid_ids:
        invalid = set(draw(st.lists(invalid_uuid_texts(max_length=KEY_LENGTH),
                                    min_size=1, max_size=3, unique=True)))
        owner.update({text: text for text in invalid})
    user_ids = draw(st.permutations(sorted(owner)))
    ghosts = draw(st.lists(UUID_BITS.filter(lambda value: value not in owner.values()),
                           min_size=1, max_size=2, unique=True)) if knobs.orphans else []

    # Then what each child points at: a kind per child, each planted kind at least once.
    loose = [kind for kind, on in (("respelled", knobs.respelled_children),
                                   ("orphan", knobs.orphans)) if on]
    kinds: dict[str, list[str]] = {table: [] for table in knobs.max_children}
    for kind in loose:
        kinds[draw(st.sampled_from(["tags", "reminders"]))].append(kind)
    if knobs.null_user_ids:
        kinds["reminders"].append("null")
    existing = ["existing"] if user_ids else []
    choices = {"journal_entries": existing, "tags": existing + loose,
               "reminders": existing + loose + ([] if knobs.null_user_ids is False else ["null"])}
    for table, allowed in choices.items():
        if allowed:
            kinds[table] += draw(st.lists(st.sampled_from(allowed),
                                          max_size=knobs.max_children[table]))

    planted: dict[str, set[Ref]] = {
        "invalid": {Ref("users", "id", text, text) for text in invalid},
        "orphan": set(), "respelled": set()}
    links: dict[str, list[_Link]] = {}
    for table, table_kinds in kinds.items():
        pks = [_spelled(draw, value, knobs.spellings, KEY_LENGTH) for value in draw(st.lists(
            UUID_BITS, min_size=len(table_kinds), max_size=len(table_kinds), unique=True))]
        links[table] = []
        for kind, pk in zip(draw(st.permutations(table_kinds)), pks, strict=True):
            if kind == "existing":
                user_id = draw(st.sampled_from(user_ids))
                link = _Link(pk, user_id, owner[user_id])
                if user_id in invalid:
                    planted["invalid"].add(Ref(table, "user_id", pk, user_id))
            elif kind == "null":
                link = _Link(pk, None, pk)
            else:
                value = draw(st.sampled_from(values if kind == "respelled" else ghosts))
                user_id = (respelling(value, owner) if kind == "respelled"
                           else _spelled(draw, value, STORABLE_SPELLINGS, KEY_LENGTH))
                link = _Link(pk, user_id, value)
                planted[kind].add(Ref(table, "user_id", pk, user_id))
            links[table].append(link)

    # Tag names are unique per UUID of the owner, not per spelling, so that
    # UNIQUE (user_id, name) holds before and after the conversion.
    tag_names: set[tuple[int | str, str]] = set()

    def tag_name(link: _Link) -> str:
        name = draw(_TAG_NAMES.filter(lambda name: (link.owner, name) not in tag_names))
        tag_names.add((link.owner, name))
        return name

    return Dataset(
        users=tuple(
            User(id=user_id, email=f"u{i}.{draw(_TEXT)}@example.test",
                 display_name=draw(_MAYBE_TEXT), is_active=draw(st.booleans()),
                 created_at=draw(_MOMENTS))
            for i, user_id in enumerate(user_ids)),
        journal_entries=tuple(
            JournalEntry(id=link.pk, user_id=link.parent, title=draw(_TEXT),
                         body=draw(_MAYBE_TEXT), mood=draw(st.none() | st.integers(1, 5)),
                         created_at=draw(_MOMENTS))
            for link in links["journal_entries"]),
        tags=tuple(Tag(id=link.pk, user_id=link.parent, name=tag_name(link),
                       color=draw(_COLORS))
                   for link in links["tags"]),
        reminders=tuple(
            Reminder(id=link.pk, user_id=link.user_id, remind_at=draw(_MOMENTS),
                     note=draw(_MAYBE_TEXT), payload=draw(_PAYLOADS), done=draw(st.booleans()))
            for link in links["reminders"]),
        planted=Planted(
            invalid_ids=frozenset(planted["invalid"]),
            collisions=frozenset(collisions),
            orphans=frozenset(planted["orphan"]),
            respelled=frozenset(planted["respelled"]),
            null_user_ids=frozenset(link.pk for link in links["reminders"]
                                    if link.user_id is None)),
    )


# ---------------------------------------------------------------- schemas for the data generator

COLUMN_TYPES: dict[str, tuple[str, ...]] = {
    # type -> CHECK templates over the column ({0}): the generator steers its values by the
    # simple ones and filters its rows by all (the first of a list is only filtered)
    "integer": ("({0} % 2) = 0", "{0} BETWEEN 1 AND 5", "{0} > 10", "{0} IN (2, 3, 5)"),
    "bigint": ("({0} % 3) <> 1", "{0} >= 0", "{0} < 1000"),
    "smallint": ("{0} BETWEEN -3 AND 3",),
    "numeric(6,2)": ("{0} >= 0", "{0} BETWEEN 1.5 AND 99"),
    "double precision": ("{0} > 0",),
    "text": ("{0} NOT LIKE '%z%'", "length({0}) >= 3", "{0} IN ('red', 'green', 'blue')",
             "{0} <> ''"),
    "varchar(5)": ("char_length({0}) <= 3",),
    "char(3)": (),
    "boolean": (),
    "date": ("{0} > '2020-01-01'",),
    "timestamptz": (),
    "time": (),
    "interval": (),
    "uuid": (),
    "jsonb": (),
    "bytea": (),
    "text[]": (),
    "integer[]": (),
    "gen.mood": (),
    "gen.mood[]": (),
    "gen.odd": (),
    "gen.short_code": (),
}
"""Column types of generated schemas; ``gen.*`` are made by :data:`SCHEMA_PRELUDE`."""
SCHEMA_PRELUDE = """
CREATE SCHEMA gen;
CREATE TYPE gen.mood AS ENUM ('happy', 'sad', 'meh');
CREATE DOMAIN gen.odd AS integer CHECK (VALUE % 2 = 1);
CREATE DOMAIN gen.short_code AS varchar(6) CHECK (VALUE <> 'x');
"""
KEY_TYPE = "varchar(36)"


@dataclass(frozen=True)
class GenColumn:
    name: str
    type: str
    not_null: bool = False
    unique: bool = False
    check: str | None = None  # a template of COLUMN_TYPES[type]
    references: str | None = None  # a table's name: its id


@dataclass(frozen=True)
class GenTable:
    name: str
    id_type: str
    columns: tuple[GenColumn, ...]
    composite_unique: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenSchema:
    """Tables ``t0``, ``t1``, ... of schema ``gen``: each has an ``id`` primary key and may
    refer to the tables before it (an FK DAG) and to itself; ``t0.id`` is a string UUID
    key, and the columns referring to it are the plan's children."""

    tables: tuple[GenTable, ...]

    def statements(self) -> list[Any]:
        """The DDL, composed with psycopg2.sql (names as identifiers)."""
        from psycopg2 import sql

        out: list[Any] = [sql.SQL(SCHEMA_PRELUDE)]
        for table in self.tables:
            parts = [sql.SQL("id {} PRIMARY KEY").format(sql.SQL(table.id_type))]
            for column in table.columns:
                part = sql.SQL("{} {}").format(sql.Identifier(column.name), sql.SQL(column.type))
                if column.not_null:
                    part += sql.SQL(" NOT NULL")
                if column.unique:
                    part += sql.SQL(" UNIQUE")
                if column.check:
                    part += sql.SQL(" CHECK ({})").format(
                        sql.SQL(column.check).format(sql.Identifier(column.name)))
                if column.references:
                    part += sql.SQL(" REFERENCES {} (id)").format(
                        sql.Identifier("gen", column.references))
                parts.append(part)
            if table.composite_unique:
                parts.append(sql.SQL("UNIQUE ({})").format(
                    sql.SQL(", ").join(map(sql.Identifier, table.composite_unique))))
            out.append(sql.SQL("CREATE TABLE {} ({})").format(
                sql.Identifier("gen", table.name), sql.SQL(", ").join(parts)))
        return out

    def children(self) -> list[tuple[str, str]]:
        """(table, column) of every column referring to ``t0.id``."""
        return [(table.name, column.name) for table in self.tables for column in table.columns
                if column.references == self.tables[0].name]


_ID_TYPES = st.sampled_from(["integer", "bigint", "text", KEY_TYPE, "uuid"])
_COLUMN_NAMES = st.sampled_from(["c", "Col ", "c$"])


@st.composite
def _gen_column(draw: st.DrawFn, name: str) -> GenColumn:
    kind = draw(st.sampled_from(sorted(COLUMN_TYPES)))
    checks = COLUMN_TYPES[kind]
    check = draw(st.sampled_from(checks)) if checks else None  # types without: no CHECK
    unique_ok = not kind.endswith("[]") and kind not in ("jsonb",)
    return GenColumn(name, kind, not_null=draw(st.booleans()),
                     unique=unique_ok and draw(st.booleans()), check=check)


@st.composite
def gen_schemas(draw: st.DrawFn, *, max_tables: int = 4, max_columns: int = 3) -> GenSchema:
    """Small schemas with random column types, NOT NULL, UNIQUE (one composite per table at
    most), simple CHECKs, and foreign keys forming a DAG, plus self-references."""
    tables: list[GenTable] = []
    for n in range(draw(st.integers(1, max_tables))):
        prefix = draw(_COLUMN_NAMES)
        columns = [draw(_gen_column(f"{prefix}{k}")) for k in range(
            draw(st.integers(0, max_columns)))]
        for target in draw(st.lists(st.sampled_from(tables), max_size=2, unique=True)
                           if tables else st.just([])):
            columns.append(GenColumn(f"ref_{target.name}", target.id_type,
                                     not_null=draw(st.booleans()),
                                     unique=draw(st.booleans()) and n % 3 == 0,
                                     references=target.name))
        id_type = KEY_TYPE if n == 0 else draw(_ID_TYPES)
        if draw(st.booleans()):  # a self-reference, NOT NULL or not
            columns.append(GenColumn("parent_id", id_type, not_null=draw(st.booleans()),
                                     references=f"t{n}"))
        composite: tuple[str, ...] = ()
        if len(columns) >= 2 and draw(st.booleans()):
            composite = tuple(draw(st.lists(st.sampled_from([c.name for c in columns]),
                                            min_size=2, max_size=2, unique=True)))
        tables.append(GenTable(f"t{n}", id_type, tuple(columns), composite))
    return GenSchema(tuple(tables))


# ---------------------------------------------------------------- the application's writes

APP_WRITE_KINDS = ("insert", "update", "update_key", "update_ref", "delete", "truncate",
                   "upsert", "copy", "orm_update")
"""What the application does to a row (``tests/app_writer.py`` runs them): ``update`` changes
a plain column, ``update_key`` the table's own key (``users.id`` included), ``update_ref``
a child's ``user_id``; ``delete`` of a user fires the children's ON DELETE actions;
``orm_update`` sets every column to the value it holds, the key included, as ORMs do."""
REPLICA_KINDS = ("insert", "update", "update_key", "update_ref", "upsert")
"""Kinds also run under ``session_replication_role = replica`` (label ``replica``): not
deletes, whose ON DELETE actions replica mode skips (orphans are no application write)."""
KEY_SOURCES = ("existing", "respelled", "new", "default", "null", "invalid")
"""Where a key value comes from: a key the table holds (``existing``, as it is spelled there;
``respelled``, another spelling of its UUID), a ``new`` UUID in a drawn spelling, the
column's ``default`` (the column left out), ``null``, or an ``invalid`` string."""


@dataclass(frozen=True)
class KeyPick:
    """A key value, resolved when the write runs, against the keys then in the table:
    ``index`` chooses among them (modulo their number, in UUID order), the spelling fields
    respell one (``respelled``), ``text`` is a ``new`` or ``invalid`` value."""

    source: str
    index: int = 0
    text: str = ""
    hyphens: tuple[int, ...] = CANONICAL_SLOTS
    braces: bool = False
    upper: int = 0


@dataclass(frozen=True)
class AppWrite:
    """One write of the application, in a transaction of its own.

    ``key`` picks the row (its primary key; for a table without one, its ``user_id``),
    ``ref`` the value written into a key column (``user_id``, or the new key of
    ``update_key``), ``text`` a plain column's value.
    """

    kind: str
    table: str
    key: KeyPick
    ref: KeyPick
    text: str
    replica: bool = False

    @property
    def label(self) -> str:
        return "replica" if self.replica else self.kind

    @property
    def features(self) -> frozenset[str]:
        """The names a write answers to in an exclusion set: its label, ``@table``,
        ``label@table``, ``key:SOURCE``, ``ref:SOURCE``, and each of the first three
        followed by one of the last two (``@memberships:ref:null``)."""
        plain = {self.label, f"@{self.table}", f"{self.label}@{self.table}"}
        picks = {f"key:{self.key.source}", f"ref:{self.ref.source}"}
        return frozenset(plain | picks | {f"{p}:{s}" for p in plain for s in picks})


_PICK_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)


@st.composite
def key_picks(draw: st.DrawFn, sources: Collection[str] = KEY_SOURCES) -> KeyPick:
    """A :class:`KeyPick` from one of ``sources``."""
    # Existing keys find rows (the others mostly miss): drawn as often as all the others.
    choices = sorted(sources)
    if "existing" in sources:
        choices += ["existing"] * (len(choices) - 1)
    source = draw(st.sampled_from(choices))
    if source == "new":
        return KeyPick(source, text=draw(uuid_texts(spellings=STORABLE_SPELLINGS,
                                                    max_length=KEY_LENGTH)))
    if source == "invalid":
        return KeyPick(source, text=draw(invalid_uuid_texts(max_length=KEY_LENGTH)))
    if source == "respelled":
        name = draw(st.sampled_from(STORABLE_SPELLINGS))
        if name == "some_hyphens":
            return KeyPick(source, draw(st.integers(0, 1000)), hyphens=tuple(
                draw(_hyphen_subsets(KEY_LENGTH - HEX_DIGITS))), upper=draw(_MASKS))
        slots, braces, upper = _PRESETS[name]
        return KeyPick(source, draw(st.integers(0, 1000)), hyphens=slots, braces=braces,
                       upper=draw(_MASKS) if upper is None else upper)
    return KeyPick(source, draw(st.integers(0, 1000)) if source == "existing" else 0)


@st.composite
def _app_write(draw: st.DrawFn, tables: tuple[str, ...], keyed: tuple[str, ...],
               children: tuple[str, ...], kinds: tuple[str, ...],
               sources: tuple[str, ...], *, replica: bool) -> AppWrite:
    on_replica = replica and draw(st.booleans())
    kind = draw(st.sampled_from([k for k in kinds if not on_replica or k in REPLICA_KINDS]))
    choices = {"update_ref": children, "orm_update": keyed}.get(kind, tables)
    table = draw(st.sampled_from(choices))
    # Two spellings of one UUID cannot both be keys of the parent once it is uuid (the
    # pre-flight refuses such data): a respelled key is looked up or referred to, never
    # written as a new parent key.
    new_parent_key = table == tables[0] and kind in ("insert", "upsert", "copy")
    key_sources = [s for s in sources if not (new_parent_key and s == "respelled")
                   # COPY returns no rows: a key it generated could not be given to the twin
                   and not (kind == "copy" and s == "default")]
    ref_sources = [s for s in sources
                   if not (table == tables[0] and kind == "update_key" and s == "respelled")]
    return AppWrite(kind, table, draw(key_picks(key_sources)), draw(key_picks(ref_sources)),
                    draw(_PICK_TEXT), replica=on_replica)


def app_writes(
    *,
    tables: Collection[str],
    keyed: Collection[str],
    children: Collection[str],
    excluded: Collection[str] = (),
    max_size: int = 6,
) -> st.SearchStrategy[list[AppWrite]]:
    """Lists of application writes over ``tables`` (the parent first; ``keyed`` have a
    primary key, ``children`` a ``user_id``).

    ``excluded`` names what never to draw: a kind, ``replica``, a key source, or any
    of :attr:`AppWrite.features` (``update_key@users``, ``ref:null``,
    ``insert@memberships:ref:null``).
    """
    gone = set(excluded)
    kinds = tuple(k for k in APP_WRITE_KINDS if k not in gone)
    sources = tuple(s for s in KEY_SOURCES if s not in gone)
    if not kinds or not sources:
        raise ValueError(f"{sorted(gone)} leaves nothing to write")
    one = _app_write(tuple(tables), tuple(keyed), tuple(children), kinds, sources,
                     replica="replica" not in gone).filter(lambda write: not write.features & gone)
    return st.lists(one, max_size=max_size)
