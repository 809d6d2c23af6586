"""Compile AIP-160 list filters into a small, typed expression tree.

Only a subset of AIP-160 is supported: comparisons ``field OP value`` with
``OP`` one of ``= != < <= > >=``, the ``AND``/``OR``/``NOT`` keywords (and ``-``
as ``NOT``), parentheses and implicit ``AND`` between whitespace-separated terms.
As AIP-160 specifies, ``OR`` binds tighter than ``AND``, so ``a AND b OR c``
means ``a AND (b OR c)``.

The tree (:class:`Compare`, :class:`Match`, :class:`And`, :class:`Or`,
:class:`Not`) names the domain's fields and carries typed values; it holds no
SQL, so each store renders it in its own dialect and no SQL crosses the store
interface (the SQLite rendering is ``sqlite_store.render_filter``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from types import MappingProxyType
from typing import Final, Literal

__all__ = [
    "BATCH_FILTER_FIELDS",
    "TRUE",
    "And",
    "Compare",
    "CompareOp",
    "Expr",
    "FilterError",
    "FilterField",
    "Match",
    "Not",
    "Or",
    "compile_filter",
]

MAX_FILTER_LENGTH: Final = 2000
MAX_DEPTH: Final = 32

_KEYWORDS: Final = frozenset({"AND", "OR", "NOT"})
_OPERATORS: Final = ("<=", ">=", "!=", "=", "<", ">")
_EQUALITY: Final = frozenset({"=", "!="})
# The tokenizer yields only these texts for "op" tokens; the map types them.
# A plain dict: a MappingProxyType lookup costs more on this per-comparison path.
_COMPARE_OPS: Final[dict[str, CompareOp]] = {"=": "=", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
# Besides letters and digits, bare words may hold the characters that appear in
# resource names, model ids and wildcards; ':' stays out because it is AIP-160's
# "has" operator, which is not supported and deserves its own error.
_WORD_PUNCTUATION: Final = frozenset("_./*-")
_FIELD_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?", re.ASCII)
_INT_RE: Final = re.compile(r"-?[0-9]+", re.ASCII)
_RFC3339_RE: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))",
    re.ASCII,
)
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ESCAPES: Final = {"n": "\n", "r": "\r", "t": "\t"}

FieldKind = Literal["enum", "bool", "string", "timestamp", "int"]
CompareOp = Literal["=", "!=", "<", "<=", ">", ">="]


@dataclass(frozen=True, slots=True)
class Compare:
    """``field op value``.

    Attributes:
        field: Domain field name (``state``, ``create_time``...), not a column.
        op: ``=``/``!=`` compare null-safely (a missing value equals nothing
            but another missing value); the others order as the value's type.
        value: ``int`` for enums (the stored number), integers and timestamps
            (microseconds since the epoch, UTC); ``bool``; ``str``.
    """

    field: str
    op: CompareOp
    value: int | bool | str


@dataclass(frozen=True, slots=True)
class Match:
    """AIP-160 wildcard equality on a string field.

    Attributes:
        field: Domain field name.
        parts: Literal pieces, in order, with any run of characters (``*``)
            between each two; ``("a", "")`` is ``a*``. Matching is ASCII
            case-insensitive, as SQL ``LIKE`` is, and always has at least two
            parts. Literal ``%``, ``_`` and ``\\`` are plain characters here:
            escaping them is the renderer's concern.
    """

    field: str
    parts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class And:
    """All of ``terms``; no terms is true (the empty filter, :data:`TRUE`)."""

    terms: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Or:
    """Any of ``terms`` (always at least two)."""

    terms: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Not:
    """The negation of ``term``."""

    term: Expr


Expr = Compare | Match | And | Or | Not
"""A compiled filter: no SQL, only domain field names and typed values."""

TRUE: Final = And(())
"""The filter that matches everything (what empty filter text compiles to)."""


class FilterError(ValueError):
    """A filter that does not parse or names an unknown field/value.

    Attributes:
        position: 0-based character offset of the problem in the filter text,
            or -1 when the problem has no single position (e.g. the length cap).
    """

    def __init__(self, message: str, position: int = -1) -> None:
        super().__init__(message)
        self.position = position


@dataclass(frozen=True)
class FilterField:
    """How one filterable field maps onto the database.

    Attributes:
        field: Domain field name the compiled tree uses (optionally
            ``group.name``); each store maps it onto its own column.
        kind: How values are parsed and which operators are allowed.
        enum_values: For ``kind="enum"``, every accepted spelling of a value
            mapped to its stored integer (several spellings may share one).
        value_prefix: For strings, prepended to values that lack it, so that
            ``echo`` can stand for ``models/echo``.
        wildcard: For strings, whether ``=`` with an unescaped ``*`` in the
            value is a wildcard match (:class:`Match`, ASCII case-insensitive).
    """

    field: str
    kind: FieldKind
    enum_values: Mapping[str, int] | None = None
    value_prefix: str = ""
    wildcard: bool = False

    def __post_init__(self) -> None:
        # Stores map field names to columns and some may interpolate them, so
        # a name that could carry anything but an identifier is refused early.
        if not _FIELD_RE.fullmatch(self.field):
            raise ValueError(f"field {self.field!r} is not a plain identifier")
        if (self.kind == "enum") != (self.enum_values is not None):
            raise ValueError("enum_values must be given exactly when kind is 'enum'")
        if (self.value_prefix or self.wildcard) and self.kind != "string":
            raise ValueError("value_prefix and wildcard apply only to string fields")


@dataclass(frozen=True, slots=True)
class _Token:
    kind: Literal["word", "string", "op", "lparen", "rparen", "minus", "end"]
    text: str
    pos: int
    spaced: bool
    # For a value holding an unescaped '*': its literal pieces between the
    # stars (Match.parts), else None.
    parts: tuple[str, ...] | None = None

    @property
    def keyword(self) -> str | None:
        return self.text if self.kind == "word" and self.text in _KEYWORDS else None


def compile_filter(text: str, fields: Mapping[str, FilterField]) -> Expr:
    """Compile an AIP-160 filter into an expression tree.

    Args:
        text: The filter as the client sent it.
        fields: Filterable field names mapped to their domain fields and kinds.

    Returns:
        The tree, over the fields' ``field`` names. Single-term ``And``/``Or``
        never appear (the term stands alone). Empty or all-whitespace text
        gives :data:`TRUE`.

    Raises:
        FilterError: The filter does not parse, is too long or too deeply
            nested, or names an unknown field or value.
    """
    if len(text) > MAX_FILTER_LENGTH:
        raise FilterError(f"filter is longer than {MAX_FILTER_LENGTH} characters")
    try:
        # Lone surrogates would only fail later, inside a store's driver.
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FilterError(f"filter is not valid Unicode at position {exc.start}", exc.start) from None
    tokens = _tokenize(text)
    if tokens[0].kind == "end":
        return TRUE
    return _Parser(tokens, fields).parse()


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while True:
        start = i
        while i < n and text[i].isspace():
            i += 1
        spaced = i > start
        if i >= n:
            tokens.append(_Token("end", "", n, spaced))
            return tokens
        c = text[i]
        if c in "\"'":
            token, i = _read_string(text, i, spaced)
            tokens.append(token)
        elif c == "(" or c == ")":
            tokens.append(_Token("lparen" if c == "(" else "rparen", c, i, spaced))
            i += 1
        elif c == "-" and not (i + 1 < n and text[i + 1].isdigit()):
            # A '-' that does not start a number is AIP-160's NOT prefix.
            tokens.append(_Token("minus", c, i, spaced))
            i += 1
        elif c.isalnum() or c in _WORD_PUNCTUATION:
            j = i + 1
            while j < n and (text[j].isalnum() or text[j] in _WORD_PUNCTUATION):
                j += 1
            word = text[i:j]
            tokens.append(_Token("word", word, i, spaced, tuple(word.split("*")) if "*" in word else None))
            i = j
        else:
            op = next((op for op in _OPERATORS if text.startswith(op, i)), None)
            if op is not None:
                tokens.append(_Token("op", op, i, spaced))
                i += len(op)
            elif c == ":":
                raise FilterError(
                    f"the ':' (has) operator at position {i} is not supported; "
                    "use =, !=, <, <=, > or >= (and quote timestamps)",
                    i,
                )
            elif c == "!":
                raise FilterError(f"unexpected '!' at position {i}; did you mean '!='?", i)
            else:
                raise FilterError(f"unexpected character {c!r} at position {i}", i)


def _read_string(text: str, start: int, spaced: bool) -> tuple[_Token, int]:
    quote = text[start]
    value: list[str] = []
    # Literal pieces between unescaped stars; the last one is still growing.
    parts: list[str] = []
    piece: list[str] = []
    i, n = start + 1, len(text)
    while i < n:
        c = text[i]
        if c == quote:
            wild = tuple([*parts, "".join(piece)]) if parts else None
            return _Token("string", "".join(value), start, spaced, wild), i + 1
        if c == "\\":
            if i + 1 >= n:
                break
            c = _ESCAPES.get(text[i + 1], text[i + 1])
            # An escaped '*' is a literal star even in a wildcard pattern.
            value.append(c)
            piece.append(c)
            i += 2
            continue
        value.append(c)
        if c == "*":
            parts.append("".join(piece))
            piece = []
        else:
            piece.append(c)
        i += 1
    raise FilterError(f"unterminated string starting at position {start}", start)


def _describe(token: _Token) -> str:
    if token.kind == "end":
        return "the end of the filter"
    if token.kind == "string":
        return f"string {token.text!r}"
    return f"'{token.text}'"


def _and(terms: list[Expr]) -> Expr:
    return terms[0] if len(terms) == 1 else And(tuple(terms))


def _or(terms: list[Expr]) -> Expr:
    return terms[0] if len(terms) == 1 else Or(tuple(terms))


class _Parser:
    """Recursive descent over AIP-160's grammar, building the tree as it goes.

    Recursion happens only for parentheses and NOT, both bounded by MAX_DEPTH;
    AND/OR chains are loops so long flat filters cannot exhaust the stack.
    """

    def __init__(self, tokens: list[_Token], fields: Mapping[str, FilterField]) -> None:
        self._tokens = tokens
        self._i = 0
        self._fields = fields

    def _peek(self) -> _Token:
        return self._tokens[self._i]

    def _next(self) -> _Token:
        token = self._tokens[self._i]
        if token.kind != "end":
            self._i += 1
        return token

    def parse(self) -> Expr:
        result = self._expression(0)
        token = self._peek()
        if token.kind == "rparen":
            raise FilterError(f"unbalanced parentheses: unexpected ')' at position {token.pos}", token.pos)
        if token.kind != "end":
            raise FilterError(f"unexpected {_describe(token)} at position {token.pos}", token.pos)
        return result

    def _expression(self, depth: int) -> Expr:
        sequences = [self._sequence(depth)]
        while self._peek().keyword == "AND":
            self._next()
            sequences.append(self._sequence(depth))
        return _and(sequences)

    def _sequence(self, depth: int) -> Expr:
        factors = [self._factor(depth)]
        while True:
            token = self._peek()
            if token.kind not in ("word", "string", "lparen", "minus") or token.keyword in ("AND", "OR"):
                break
            previous = self._tokens[self._i - 1]
            # Implicit AND needs whitespace, as in AIP-160, except where a
            # parenthesis already makes the boundary plain.
            if not token.spaced and token.kind != "lparen" and previous.kind != "rparen":
                raise FilterError(f"unexpected {_describe(token)} at position {token.pos}", token.pos)
            factors.append(self._factor(depth))
        return _and(factors)

    def _factor(self, depth: int) -> Expr:
        terms = [self._term(depth)]
        while self._peek().keyword == "OR":
            self._next()
            terms.append(self._term(depth))
        return _or(terms)

    def _term(self, depth: int) -> Expr:
        token = self._peek()
        if token.kind == "minus" or token.keyword == "NOT":
            self._next()
            self._check_depth(depth + 1, token)
            return Not(self._term(depth + 1))
        if token.kind == "lparen":
            self._next()
            self._check_depth(depth + 1, token)
            if self._peek().kind == "rparen":
                raise FilterError(f"empty parentheses at position {token.pos}", token.pos)
            result = self._expression(depth + 1)
            closing = self._peek()
            if closing.kind != "rparen":
                raise FilterError(
                    f"unbalanced parentheses: '(' at position {token.pos} is not closed; "
                    f"got {_describe(closing)} at position {closing.pos}",
                    closing.pos,
                )
            self._next()
            return result
        return self._restriction()

    @staticmethod
    def _check_depth(depth: int, token: _Token) -> None:
        if depth > MAX_DEPTH:
            raise FilterError(f"filter nests deeper than {MAX_DEPTH} levels at position {token.pos}", token.pos)

    def _restriction(self) -> Expr:
        token = self._next()
        if token.kind != "word" or token.keyword is not None:
            raise FilterError(
                f"expected a comparison such as 'state = SUCCEEDED' or '(' at position {token.pos}, "
                f"got {_describe(token)}",
                token.pos,
            )
        name = token.text
        field = self._fields.get(name)
        if field is None:
            hint = "; AND, OR and NOT must be upper case" if name.upper() in _KEYWORDS else ""
            raise FilterError(
                f'unknown field "{name}" at position {token.pos}; '
                f"filterable fields: {', '.join(sorted(self._fields))}{hint}",
                token.pos,
            )
        op = self._next()
        if op.kind != "op":
            raise FilterError(
                f'expected a comparison operator (=, !=, <, <=, >, >=) after "{name}" '
                f"at position {op.pos}, got {_describe(op)}",
                op.pos,
            )
        value = self._next()
        if value.kind not in ("word", "string") or value.keyword is not None:
            raise FilterError(
                f"expected a value after '{op.text}' at position {value.pos}, got {_describe(value)}",
                value.pos,
            )
        return _compare(name, field, op, value)


def _compare(name: str, field: FilterField, op: _Token, value: _Token) -> Expr:
    if field.kind in ("enum", "bool") and op.text not in _EQUALITY:
        raise FilterError(
            f"operator '{op.text}' at position {op.pos} is not supported for {field.kind} "
            f'field "{name}"; use = or !=',
            op.pos,
        )
    param: int | bool | str
    text = value.text
    if field.kind == "enum":
        assert field.enum_values is not None
        number = field.enum_values.get(text)
        if number is None:
            raise FilterError(
                f'unknown value "{text}" for field "{name}" at position {value.pos}; '
                f"expected one of: {_enum_names(field.enum_values)}",
                value.pos,
            )
        param = number
    elif field.kind == "bool":
        if text not in ("true", "false"):
            raise FilterError(
                f'expected true or false for field "{name}" at position {value.pos}, got "{text}"',
                value.pos,
            )
        param = text == "true"
    elif field.kind == "int":
        param = _parse_int(name, value)
    elif field.kind == "timestamp":
        param = _parse_timestamp(name, value)
    else:
        prefixed = field.value_prefix and not text.startswith(field.value_prefix)
        if field.wildcard and op.text == "=" and value.parts is not None:
            first, *rest = value.parts
            return Match(field.field, (field.value_prefix + first if prefixed else first, *rest))
        param = field.value_prefix + text if prefixed else text
    return Compare(field.field, _COMPARE_OPS[op.text], param)


def _enum_names(values: Mapping[str, int]) -> str:
    # Several spellings share a number; list the shortest of each to keep the
    # message readable.
    shortest: dict[int, str] = {}
    for spelling, number in values.items():
        best = shortest.get(number)
        if best is None or (len(spelling), spelling) < (len(best), best):
            shortest[number] = spelling
    return ", ".join(shortest[number] for number in sorted(shortest))


def _parse_int(name: str, value: _Token) -> int:
    # int() alone would also take '1_000', ' 7' and non-ASCII digits.
    if not _INT_RE.fullmatch(value.text):
        raise FilterError(
            f'expected an integer for field "{name}" at position {value.pos}, got "{value.text}"',
            value.pos,
        )
    number = int(value.text)
    # Stores keep 64-bit integers (sqlite3 raises OverflowError at execute
    # time for anything wider).
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise FilterError(f'integer for field "{name}" at position {value.pos} is out of range', value.pos)
    return number


def _parse_timestamp(name: str, value: _Token) -> int:
    """Parse RFC 3339 into microseconds since the epoch, truncating finer digits."""
    match = _RFC3339_RE.fullmatch(value.text)
    error = FilterError(
        f'expected an RFC 3339 timestamp such as "2026-01-01T00:00:00Z" for field "{name}" '
        f'at position {value.pos}, got "{value.text}"',
        value.pos,
    )
    if match is None:
        raise error
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    micros = int((fraction or "").ljust(6, "0")[:6])
    try:
        if zulu:
            tz: timezone = UTC
        else:
            if int(off_h) > 23 or int(off_m) > 59:
                raise error
            offset = timedelta(hours=int(off_h), minutes=int(off_m))
            tz = timezone(-offset if sign == "-" else offset)
        moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micros, tzinfo=tz)
        return (moment - _EPOCH) // timedelta(microseconds=1)
    except (ValueError, OverflowError):
        raise error from None


def _batch_states() -> Mapping[str, int]:
    names = ["UNSPECIFIED", "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED"]
    values: dict[str, int] = {}
    for number, short in enumerate(names):
        values[short] = number
        values[f"BATCH_STATE_{short}"] = number
    return MappingProxyType(values)


BATCH_FILTER_FIELDS: Final[Mapping[str, FilterField]] = MappingProxyType(
    {
        "state": FilterField("state", "enum", _batch_states()),
        "done": FilterField("done", "bool"),
        "model": FilterField("model", "string", value_prefix="models/"),
        "display_name": FilterField("display_name", "string", wildcard=True),
        "create_time": FilterField("create_time", "timestamp"),
        "priority": FilterField("priority", "int"),
    }
)
"""Filterable fields of ListOperations, named as the batch's domain fields."""
