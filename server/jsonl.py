"""Fast parsing of batch input lines: ``{"key": "...", "request": {<request in proto JSON>}}``.

``json_format.Parse`` costs about 53 µs a line, which caps file ingest near
19k lines/s. Here a line is decoded by orjson and the dict turned straight into
protobuf *wire bytes*, driven by tables built from the message descriptors;
upb then parses those bytes in one C call, which is far cheaper than making
each sub-message from Python. ``bench/bench_parse.py`` measures the routes.

Acceptance follows ``json_format.ParseDict(..., ignore_unknown_fields=False)``
on the decoded request, quirks included, so a line is accepted or refused as
that route would, and gives the identical message:

* every field by its JSON (camelCase) or proto (snake_case) name;
* ``null`` for any field means unset; ``null`` inside a list is an error;
* integers as JSON numbers (``1.0`` yes, ``1.5`` no) or strings that Python's
  ``int()`` or, failing that, an integral ``float()`` reads, no ``" "``
  allowed; int32 range enforced;
* floats as numbers, ``true``/``false``, or strings ``float()`` reads
  (``"NaN"``, ``"Infinity"``, ``"-Infinity"``...) except ``"nan"``; a JSON
  number beyond float32's range is refused, a string one becomes infinity;
* bytes as standard or URL-safe base64, padded or not, decoded exactly as
  ``base64.urlsafe_b64decode`` (non-alphabet characters are skipped);
* enums by name, or by number in any form ``int()`` takes (``1.5`` and
  ``true`` read as 1); numbers outside the enum are kept (proto3 enums are
  open) if they fit int32;
* a message written as ``""`` or ``[]`` is an empty message.

Deliberate differences, all stricter except the first:

* ``task_type`` also takes Gemini's short names (``"RETRIEVAL_DOCUMENT"``).
* A field given under both its names (``"mimeType"`` and ``"mime_type"``) is
  refused; ParseDict refuses that only for ``optional`` and oneof fields and
  otherwise silently keeps the later one, or merges two messages.
* A key repeated inside one JSON object is refused, as ``json_format.Parse``
  does; orjson (like ``json.loads``) would silently keep the last one.
* The top level must be an object holding ``request`` (an object) and
  optionally ``key`` (a string or null) and nothing else.

Field kinds absent from today's protos (bools, 64-bit integers, doubles,
maps, well-known types) have no table entry: a line using one is handed to
ParseDict whole, so a proto change cannot make this module wrong, only slower.
"""

from __future__ import annotations

import binascii
import json
import math
import struct
from collections.abc import Callable
from typing import Any, Final, TypeVar

import orjson
from google.protobuf import descriptor, json_format
from google.protobuf.message import Message

from longbatch.v1 import content_pb2

from .wire import varint

__all__ = ["LineError", "parse_embed_line", "parse_generate_line", "plain_generate_payload"]

_M = TypeVar("_M", bound=Message)


class LineError(ValueError):
    """Why one line is not a valid request line.

    The message is short and names the field, for example
    ``request.contents[0].parts[1]: unknown field "txt"``.
    """


class _Bad(Exception):
    """A refusal deep in a request; callers on the way out add path segments."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str] = []  # innermost first


class _Unsupported(Exception):
    """A field kind this module does not encode: the line goes to ParseDict."""


# What _check_duplicate_keys needs to know of the decoded line: [keys + colons
# inside strings, colons inside strings]. Encoders add each object's keys, and
# pass every string that reaches the message through _colons.
_Tally = list[int]

# A field handler turns one non-null JSON value into the field's complete wire
# bytes (tag included; b"" when nothing needs writing) or raises _Bad.
_Handler = Callable[[Any, _Tally], bytes]

_INT32_MIN: Final = -(2**31)
_INT32_MAX: Final = 2**31 - 1
_FLOAT_MAX: Final = 3.4028234663852886e38  # what json_format range-checks float fields against
_UINT64: Final = 2**64 - 1
_WIRE_VARINT: Final = 0
_WIRE_LEN: Final = 2
_WIRE_I32: Final = 5
_URLSAFE: Final = bytes.maketrans(b"-_", b"+/")
_pack_f32 = struct.Struct("<f").pack


# Lengths under 16 KiB cover nearly every string and message on the hot path.
_NVAR: Final = 1 << 14
_VARINTS: Final = [varint(i) for i in range(_NVAR)]


def _length(n: int) -> bytes:
    return _VARINTS[n] if n < _NVAR else varint(n)


def _colons(text: str, tally: _Tally) -> None:
    n = text.count(":")
    tally[0] += n
    tally[1] += n


def _show(value: object) -> str:
    """A short rendering of a JSON value for an error message."""
    if isinstance(value, str):
        text = orjson.dumps(value).decode()
        return text if len(text) <= 40 else text[:36] + '..."'
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return repr(value)


# ---------------------------------------------------------------- scalar rules


def _to_int32(value: Any) -> int:
    """json_format's integer rules (``_ConvertInteger``) plus the int32 range check upb applies on assignment."""
    kind = type(value)
    if kind is int:
        number: int = value
    elif kind is float:
        if not value.is_integer():
            raise _Bad(f"expected an integer, got {_show(value)}")
        number = int(value)
    elif kind is str:
        if " " in value:
            raise _Bad(f"expected an integer, got {_show(value)}")
        try:
            number = int(value)
        except ValueError:
            try:
                f = float(value)
            except ValueError:
                raise _Bad(f"expected an integer, got {_show(value)}") from None
            if not f.is_integer():
                raise _Bad(f"expected an integer, got {_show(value)}") from None
            number = int(f)
    else:
        raise _Bad(f"expected an integer, got {_show(value)}")
    if not _INT32_MIN <= number <= _INT32_MAX:
        raise _Bad(f"integer out of range: {_show(value)}")
    return number


def _to_float(value: Any) -> float:
    """json_format's float rules (``_ConvertFloat``); ``true``/``false`` pass as 1.0/0.0 there too."""
    kind = type(value)
    if kind is float:
        if math.isnan(value) or not -_FLOAT_MAX <= value <= _FLOAT_MAX:
            raise _Bad(f"number out of float range: {_show(value)}")
        return float(value)
    if kind is int or kind is bool:
        try:
            return float(value)
        except OverflowError:
            raise _Bad(f"number out of float range: {_show(value)}") from None
    if kind is str and value != "nan":
        try:
            return float(value)
        except ValueError:
            pass
    raise _Bad(f"expected a number, got {_show(value)}")


def _f32(value: float) -> bytes:
    # upb narrows with a C cast, which turns overflow into infinity; struct raises instead.
    try:
        return _pack_f32(value)
    except OverflowError:
        return _pack_f32(math.copysign(math.inf, value))


def _to_bytes(value: Any) -> bytes:
    """json_format's bytes rule: pad, then ``base64.urlsafe_b64decode`` (lenient, standard or URL-safe)."""
    if type(value) is not str:
        raise _Bad(f"expected a base64 string, got {_show(value)}")
    raw = value.encode()
    try:
        return binascii.a2b_base64((raw + b"=" * (4 - len(raw) % 4)).translate(_URLSAFE))
    except binascii.Error:
        raise _Bad(f"invalid base64: {_show(value)}") from None


def _enum_converter(enum: descriptor.EnumDescriptor, aliases: dict[str, int]) -> Callable[[Any], int]:
    names = {v.name: v.number for v in enum.values} | aliases
    by_number = enum.values_by_number

    def convert(value: Any) -> int:
        if type(value) is str:
            found = names.get(value)
            if found is not None:
                return found
        elif isinstance(value, (dict, list)):
            raise _Bad(f"expected an enum name or number, got {_show(value)}")
        # Numbers follow json_format's enum path exactly: int() of the value
        # (so 1.5 -> 1, true -> 1, " 7" -> 7), then a lookup in upb's
        # values_by_number, which wraps the key to int32 (2**32 + 5 finds 5).
        try:
            number = int(value)
        except (ValueError, OverflowError):
            raise _Bad(f"unknown enum value {_show(value)} for {enum.name}") from None
        known = by_number.get(number)
        if known is not None:
            return known.number
        if not _INT32_MIN <= number <= _INT32_MAX:
            raise _Bad(f"enum number out of range: {_show(value)}")
        return number

    return convert


# ---------------------------------------------------------------- message tables

# What _encode does with a field's value; the common kinds are handled inline
# there (a Python call per field would cost as much as the rest of the work).
_STRING: Final = 0  # arg: implicit presence (an empty string is not written)
_MESSAGES: Final = 1  # repeated message; arg: its _Spec
_MESSAGE: Final = 2  # arg: its _Spec
_FLOAT: Final = 3  # arg: implicit presence
_INT32: Final = 4  # arg: implicit presence
_OTHER: Final = 5  # arg: a _Handler

# Gemini's request files name task types without the enum prefix.
_TASK_TYPE_ALIASES: Final = {
    v.name.removeprefix("TASK_TYPE_"): v.number
    for v in content_pb2.TaskType.DESCRIPTOR.values
    if v.name != "TASK_TYPE_UNSPECIFIED"
}
_ENUM_ALIASES: Final = {content_pb2.TaskType.DESCRIPTOR.full_name: _TASK_TYPE_ALIASES}


class _Spec:
    """How to encode one message type from a JSON object."""

    __slots__ = ("fast", "fields", "oneofs")

    def __init__(self) -> None:
        # Either JSON key -> (kind, tag, the field's other key or None when both names are the same, arg).
        self.fields: dict[str, tuple[int, bytes, str | None, Any]] = {}
        # Real oneofs: each member's keys, and the members' names for messages.
        self.oneofs: list[tuple[list[tuple[str, ...]], str]] = []
        # A shortcut for this message's commonest shape: wire bytes, or None to take the general route.
        self.fast: Callable[[Any, _Tally], bytes | None] | None = None


def _tag(field: descriptor.FieldDescriptor, wire_type: int) -> bytes:
    return varint(field.number << 3 | wire_type)


def _unsupported(value: Any, tally: _Tally) -> bytes:
    raise _Unsupported


def _repeated(item: _Handler) -> _Handler:
    def handle(value: Any, tally: _Tally) -> bytes:
        if type(value) is not list:
            raise _Bad(f"expected a list, got {_show(value)}")
        out = []
        for index, element in enumerate(value):
            try:
                if element is None:
                    raise _Bad("null is not allowed in a list")
                out.append(item(element, tally))
            except _Bad as e:
                e.path.append(f"[{index}]")
                raise
        return b"".join(out)

    return handle


def _string_item(tag: bytes) -> _Handler:
    def handle(value: Any, tally: _Tally) -> bytes:
        if type(value) is not str:
            raise _Bad(f"expected a string, got {_show(value)}")
        if ":" in value:
            _colons(value, tally)
        raw = value.encode()
        return tag + _length(len(raw)) + raw

    return handle


def _bytes_field(tag: bytes, implicit: bool) -> _Handler:
    def handle(value: Any, tally: _Tally) -> bytes:
        raw = _to_bytes(value)
        if ":" in value:
            _colons(value, tally)
        return b"" if implicit and not raw else tag + _length(len(raw)) + raw

    return handle


def _enum_field(tag: bytes, implicit: bool, enum: descriptor.EnumDescriptor) -> _Handler:
    convert = _enum_converter(enum, _ENUM_ALIASES.get(enum.full_name, {}))

    def handle(value: Any, tally: _Tally) -> bytes:
        number = convert(value)
        return b"" if implicit and not number else tag + varint(number & _UINT64)

    return handle


def _plain_message(field: descriptor.FieldDescriptor) -> descriptor.Descriptor | None:
    """The field's message type if this module encodes it itself (well-known types have JSON forms of their own)."""
    message = field.message_type
    if message is None or message.full_name.startswith("google.protobuf.") or message.GetOptions().map_entry:
        return None
    return message


def _field_entry(field: descriptor.FieldDescriptor, specs: dict[str, _Spec]) -> tuple[int, bytes, Any]:
    t = descriptor.FieldDescriptor
    kind = field.type
    implicit = not field.has_presence
    message = _plain_message(field)
    if field.is_repeated:
        if message is not None:
            return _MESSAGES, _tag(field, _WIRE_LEN), _spec_for(message, specs)
        if kind == t.TYPE_STRING:
            return _OTHER, b"", _repeated(_string_item(_tag(field, _WIRE_LEN)))
    elif kind == t.TYPE_STRING:
        return _STRING, _tag(field, _WIRE_LEN), implicit
    elif message is not None:
        return _MESSAGE, _tag(field, _WIRE_LEN), _spec_for(message, specs)
    elif kind == t.TYPE_FLOAT:
        return _FLOAT, _tag(field, _WIRE_I32), implicit
    elif kind == t.TYPE_INT32:
        return _INT32, _tag(field, _WIRE_VARINT), implicit
    elif kind == t.TYPE_BYTES:
        return _OTHER, b"", _bytes_field(_tag(field, _WIRE_LEN), implicit)
    elif field.enum_type is not None:
        return _OTHER, b"", _enum_field(_tag(field, _WIRE_VARINT), implicit, field.enum_type)
    # Not in today's protos (64-bit ints, bools, doubles, well-known types,
    # maps, packed repeated scalars...): such a line takes the slow, exact route.
    return _OTHER, b"", _unsupported


def _spec_for(message: descriptor.Descriptor, specs: dict[str, _Spec]) -> _Spec:
    found = specs.get(message.full_name)
    if found is not None:
        return found
    spec = specs[message.full_name] = _Spec()  # registered first: recursive types terminate
    for field in message.fields:
        kind, tag, arg = _field_entry(field, specs)
        if field.json_name == field.name:
            spec.fields[field.name] = (kind, tag, None, arg)
        else:
            spec.fields[field.json_name] = (kind, tag, field.name, arg)
            spec.fields[field.name] = (kind, tag, field.json_name, arg)
    for oneof in message.oneofs:
        if len(oneof.fields) > 1:  # single-field (proto3 optional) oneofs can only clash through both names
            members = [tuple({f.json_name, f.name}) for f in oneof.fields]
            spec.oneofs.append((members, " and ".join(f'"{f.json_name}"' for f in oneof.fields)))
    return spec


def _encode(spec: _Spec, obj: Any, tally: _Tally) -> bytes:
    """The wire bytes of one message given as a JSON value.

    Fields come out in the order of the JSON keys, which upb parses the same as
    field-number order. ``tally`` is the line's _Tally.
    """
    if type(obj) is not dict:
        # json_format iterates the value as if it were an object, so "" and [] come out as an empty message.
        if obj == "" or obj == []:
            return b""
        raise _Bad(f"expected an object, got {_show(obj)}")
    tally[0] += len(obj)
    fields = spec.fields
    lengths = _VARINTS
    out = []
    for key, value in obj.items():
        entry = fields.get(key)
        if entry is None:
            raise _Bad(f"unknown field {_show(key)}")
        kind, tag, other, arg = entry
        if other is not None and other in obj:
            raise _Bad(f"field given twice, as {_show(key)} and {_show(other)}")
        if value is None:  # null means unset
            continue
        try:
            if kind == _STRING:
                if type(value) is not str:
                    raise _Bad(f"expected a string, got {_show(value)}")
                if ":" in value:
                    _colons(value, tally)
                if value or not arg:
                    raw = value.encode()
                    n = len(raw)
                    out.append(tag + (lengths[n] if n < _NVAR else varint(n)) + raw)
            elif kind == _MESSAGES:
                if type(value) is not list:
                    raise _Bad(f"expected a list, got {_show(value)}")
                index = 0
                fast = arg.fast
                for element in value:
                    payload = None if fast is None else fast(element, tally)
                    if payload is None:
                        try:
                            if element is None:
                                raise _Bad("null is not allowed in a list")
                            payload = _encode(arg, element, tally)
                        except _Bad as e:
                            e.path.append(f"[{index}]")
                            raise
                    n = len(payload)
                    out.append(tag + (lengths[n] if n < _NVAR else varint(n)) + payload)
                    index += 1
            elif kind == _MESSAGE:
                payload = None if arg.fast is None else arg.fast(value, tally)
                if payload is None:
                    payload = _encode(arg, value, tally)
                n = len(payload)
                out.append(tag + (lengths[n] if n < _NVAR else varint(n)) + payload)
            elif kind == _FLOAT:
                if type(value) is float and -_FLOAT_MAX <= value <= _FLOAT_MAX:
                    packed = _pack_f32(value)
                else:
                    packed = _f32(_to_float(value))
                if packed != b"\0\0\0\0" or not arg:  # implicit presence skips only +0.0, as upb does
                    out.append(tag + packed)
            elif kind == _INT32:
                if type(value) is not int or not 0 <= value < _NVAR:
                    value = _to_int32(value)
                    if value < 0 or value >= _NVAR:
                        out.append(tag + varint(value & _UINT64))  # negatives: 10 bytes, two's complement
                        continue
                if value or not arg:
                    out.append(tag + lengths[value])
            else:
                out.append(arg(value, tally))
        except _Bad as e:
            e.path.append("." + key)
            raise
    if spec.oneofs and len(obj) > 1:
        for members, names in spec.oneofs:
            if sum(1 for keys in members if any(obj.get(k) is not None for k in keys)) > 1:
                raise _Bad(f"only one of {names} may be set")
    return b"".join(out)


def _text_content() -> Callable[[Any, _Tally], bytes | None]:
    """A shortcut for Content of text parts only, the bulk of every file.

    It takes ``{"parts": [{"text": "..."}, ...], "role": "..."}`` (``role``
    optional, no nulls) in well under half the general route's time and gives
    up on anything else, which _encode then accepts or refuses with reasons.
    """
    content = content_pb2.Content.DESCRIPTOR.fields_by_name
    text = content_pb2.Part.DESCRIPTOR.fields_by_name["text"]
    if content["role"].has_presence or any(f.json_name != f.name for f in (content["parts"], content["role"], text)):
        raise RuntimeError("Content or Part changed: _text_content writes role only when set and knows one name each")
    parts_tag, role_tag, text_tag = (_tag(f, _WIRE_LEN) for f in (content["parts"], content["role"], text))
    lengths = _VARINTS
    longest = _NVAR - 8  # keeps a part's own length in the table too

    def encode(obj: Any, tally: _Tally) -> bytes | None:
        if type(obj) is not dict:
            return None
        parts = obj.get("parts")
        role = obj.get("role", "")
        if type(parts) is not list or type(role) is not str or len(obj) != 1 + ("role" in obj):
            return None
        out = []
        colons = role.count(":") if ":" in role else 0
        for part in parts:
            if type(part) is not dict or len(part) != 1:
                return None
            value = part.get("text")
            if type(value) is not str:
                return None
            if ":" in value:
                colons += value.count(":")
            raw = value.encode()
            n = len(raw)
            if n >= longest:
                return None
            out.append(parts_tag + lengths[len(text_tag) + len(lengths[n]) + n] + text_tag + lengths[n] + raw)
        if role:
            raw = role.encode()
            n = len(raw)
            if n >= _NVAR:
                return None
            out.append(role_tag + lengths[n] + raw)
        tally[0] += len(obj) + len(parts) + colons
        tally[1] += colons
        return b"".join(out)

    return encode


_SPECS: dict[str, _Spec] = {}
_GENERATE: Final = _spec_for(content_pb2.GenerateContentRequest.DESCRIPTOR, _SPECS)
_EMBED: Final = _spec_for(content_pb2.EmbedContentRequest.DESCRIPTOR, _SPECS)
_TEXT_CONTENT: Final = _text_content()
_SPECS[content_pb2.Content.DESCRIPTOR.full_name].fast = _TEXT_CONTENT
# Bound once: looking FromString up on a upb class costs a third of the call.
_GENERATE_FROM: Final = content_pb2.GenerateContentRequest.FromString
_EMBED_FROM: Final = content_pb2.EmbedContentRequest.FromString


# ---------------------------------------------------------------- lines


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> None:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)


def _check_duplicate_keys(line: bytes, keys: int) -> None:
    """Refuse a line where one object repeats a key, which orjson would have collapsed.

    Args:
        line: The raw line.
        keys: How many keys the decoded objects hold together (-1: unknown).

    Every key in the text has a colon of its own, right after its closing
    quote or after whitespace; any other colon sits inside a string. So if the
    line holds exactly as many colons as the decoded objects hold keys, plus
    the colons inside their strings, and no string spells a colon as an
    escape, no key was repeated: a repeated key brings a colon of its own on
    top. _parse checks that inline, as it settles nearly every line. Here
    comes the next try, ``":`` counted once whitespace is dropped, then a
    re-read with a decoder that sees every key.
    """
    if line.translate(None, b" \t\r\n").count(b'":') == keys:
        return
    try:
        json.loads(line, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise LineError(f"duplicate key {_show(e.args[0])}") from None


def _top_level(obj: Any) -> tuple[str, dict[str, Any]]:
    """The key and request of a line that _parse's quick look did not pass, or why it is not a request line."""
    if type(obj) is not dict:
        raise LineError(f"a line must be a JSON object, got {_show(obj)}")
    for name in obj:
        if name not in ("key", "request"):
            raise LineError(f'unknown top-level field {_show(name)}; a line holds only "key" and "request"')
    request = obj.get("request")
    if request is None:
        raise LineError('"request" is missing')
    if type(request) is not dict:
        raise LineError(f'"request" must be an object, got {_show(request)}')
    key = obj.get("key")
    if key is None:
        return "", request
    if type(key) is not str:
        raise LineError(f'"key" must be a string, got {_show(key)}')
    return key, request


def _parse(line: bytes, spec: _Spec, cls: type[_M], from_string: Callable[[bytes], _M]) -> tuple[str, _M]:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise LineError(f"not valid JSON: {e}") from None
    try:
        request = obj["request"]
        key = obj.get("key", "")
        if type(request) is not dict or type(key) is not str or len(obj) != 1 + ("key" in obj):
            raise KeyError
    except (KeyError, TypeError, AttributeError):
        key, request = _top_level(obj)
    tally = [len(obj), 0]
    if ":" in key:
        _colons(key, tally)
    try:
        wire = _encode(spec, request, tally)
    except _Bad as e:
        raise LineError(f"request{''.join(reversed(e.path))}: {e.message}") from None
    except _Unsupported:
        _check_duplicate_keys(line, -1)
        try:
            return key, json_format.ParseDict(request, cls())
        except Exception as e:  # ParseDict lets TypeError and the like escape on odd input
            raise LineError(f"request: {str(e).splitlines()[0]}") from None
    # Inline, the common case of _check_duplicate_keys: as many colons as keys
    # plus colons in strings, none of those written as an escape (\u003a).
    keys_and_colons, colons = tally
    if line.count(b":") != keys_and_colons or (colons and line.find(b"\\") >= 0 and b"\\u003" in line):
        _check_duplicate_keys(line, keys_and_colons - colons)
    return key, from_string(wire)


def parse_generate_line(line: bytes) -> tuple[str, content_pb2.GenerateContentRequest]:
    """Parse one line of a generation batch file.

    Args:
        line: One JSONL line, ``{"key": "...", "request": {...}}``, with or
            without its line ending; the request is a
            ``GenerateContentRequest`` in proto JSON.

    Returns:
        The key (``""`` when absent or null) and the request.

    Raises:
        LineError: The line is not valid UTF-8 JSON, is not shaped as above,
            or the request is not a valid ``GenerateContentRequest``.
    """
    return _parse(line, _GENERATE, content_pb2.GenerateContentRequest, _GENERATE_FROM)


_CONTENTS_TAG: Final = _tag(content_pb2.GenerateContentRequest.DESCRIPTOR.fields_by_name["contents"], _WIRE_LEN)
_PLAIN_ROLES: Final = frozenset(("", "user", "model"))
"""The roles validate.py accepts; a test keeps the two in step."""


def plain_generate_payload(line: bytes) -> tuple[str, bytes] | None:
    """The key and serialized request of a plain generation line, or None.

    A plain line is ``{"key": "...", "request": {"contents": [...]}}`` whose
    contents are non-empty lists of text parts with the role ``user``,
    ``model`` or none: the shape of nearly every line of a batch file. Such a
    request passes validation by construction, so its bytes go straight to
    storage without the message being built, validated and serialized again,
    which costs twice the parse. The bytes are ``SerializeToString()``'s.

    Any other line, good or bad, gives None: it takes parse_generate_line and
    validation, which accept it or say why not.
    """
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if type(obj) is not dict:
        return None
    request = obj.get("request")
    key = obj.get("key", "")
    if type(request) is not dict or type(key) is not str or len(obj) != 1 + ("key" in obj) or len(request) != 1:
        return None
    contents = request.get("contents")
    if type(contents) is not list or not contents:
        return None
    tally = [len(obj) + 1, 0]
    if ":" in key:
        _colons(key, tally)
    out = []
    for content in contents:
        payload = _TEXT_CONTENT(content, tally)
        if payload is None or not content["parts"] or content.get("role", "") not in _PLAIN_ROLES:
            return None
        out.append(_CONTENTS_TAG + _length(len(payload)) + payload)
    # As in _parse: a colon count off by any amount may hide a repeated key.
    keys_and_colons, colons = tally
    if line.count(b":") != keys_and_colons or (colons and b"\\u003" in line):
        return None
    return key, b"".join(out)


def parse_embed_line(line: bytes) -> tuple[str, content_pb2.EmbedContentRequest]:
    """Parse one line of an embedding batch file.

    Args:
        line: One JSONL line, ``{"key": "...", "request": {...}}``, with or
            without its line ending; the request is an
            ``EmbedContentRequest`` in proto JSON. ``taskType`` may use the
            enum's names (``"TASK_TYPE_RETRIEVAL_DOCUMENT"``), Gemini's short
            names (``"RETRIEVAL_DOCUMENT"``) or numbers.

    Returns:
        The key (``""`` when absent or null) and the request.

    Raises:
        LineError: The line is not valid UTF-8 JSON, is not shaped as above,
            or the request is not a valid ``EmbedContentRequest``.
    """
    return _parse(line, _EMBED, content_pb2.EmbedContentRequest, _EMBED_FROM)
