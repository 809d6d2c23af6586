"""The fast JSONL request parser accepts and builds exactly what json_format.ParseDict does.

Every case is checked against ``json_format.ParseDict(request, Message())``
(``ignore_unknown_fields=False``) on the same decoded request: the parser must
accept exactly when ParseDict accepts and produce an identical message. The
documented differences are checked as such: Gemini's short ``taskType`` names
are accepted (compared against ParseDict given the full name), and a field
given under both its names, or a key repeated inside one object, is refused.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from google.protobuf import descriptor, descriptor_pb2, json_format
from google.protobuf.message import Message
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from longbatch.server import jsonl, validate
from longbatch.server.jsonl import LineError, parse_embed_line, parse_generate_line
from longbatch.server.validate import Violations, validate_generate_request
from longbatch.v1 import content_pb2

GEN = content_pb2.GenerateContentRequest
EMB = content_pb2.EmbedContentRequest
Parser = Callable[[bytes], tuple[str, Message]]
PARSERS: dict[type[Message], Parser] = {GEN: parse_generate_line, EMB: parse_embed_line}

SHORT_TASK_TYPES = {
    v.name.removeprefix("TASK_TYPE_"): v.name for v in content_pb2.TaskType.DESCRIPTOR.values if v.number != 0
}
# Every (camelCase, snake_case) pair of the request messages, for spotting a field given under both names.
TWO_NAMED = {
    frozenset((f.json_name, f.name))
    for m in (GEN, EMB, content_pb2.Content, content_pb2.Part, content_pb2.Blob, content_pb2.GenerationConfig)
    for f in m.DESCRIPTOR.fields
    if f.json_name != f.name
}


# --------------------------------------------------------------------------- the oracle


def reference(request: Any, cls: type[Message]) -> Message | None:
    """ParseDict's verdict on a decoded request: the message, or None when it refuses."""
    try:
        return json_format.ParseDict(request, cls())
    except Exception:  # ParseError, but odd input also lets TypeError and the like escape
        return None


def gives_both_names(value: Any) -> bool:
    """Whether some object anywhere in ``value`` holds one field under both its names."""
    if isinstance(value, dict):
        return any(pair <= value.keys() for pair in TWO_NAMED) or any(gives_both_names(v) for v in value.values())
    if isinstance(value, list):
        return any(gives_both_names(v) for v in value)
    return False


def with_full_task_type(request: Any) -> Any:
    """The request with a short Gemini task type name replaced by the enum's own name."""
    if not isinstance(request, dict):
        return request
    return {k: SHORT_TASK_TYPES.get(v, v) if k in ("taskType", "task_type") and isinstance(v, str) else v
            for k, v in request.items()}


def has_nan(message: Message) -> bool:
    config = getattr(message, "generation_config", None)
    return config is not None and any(math.isnan(getattr(config, f)) for f in ("temperature", "top_p"))


def check(request: Any, cls: type[Message], key: Any = "k-1") -> bool:
    """Check one request, written as a line, against ParseDict; return whether it was accepted."""
    line = orjson.dumps({"key": key, "request": request})
    if key is not None and not isinstance(key, str):
        with pytest.raises(LineError, match=r'^"key" must be a string'):
            PARSERS[cls](line)
        return False
    return check_line(line, cls, orjson.loads(line)["request"])


def check_line(line: bytes, cls: type[Message], request: Any) -> bool:
    try:
        key, mine = PARSERS[cls](line)
    except LineError as e:
        assert str(e)
        got: Message | None = None
    else:
        assert isinstance(mine, cls)
        assert key == (orjson.loads(line).get("key") or "")
        got = mine
    if not isinstance(request, dict):
        assert got is None, "a request must be an object"  # ParseDict would take "" or [] as an empty one
        return False
    if gives_both_names(request):
        assert got is None, "a field given under both its names must be refused"
        return False
    want = reference(with_full_task_type(request), cls)
    if want is None or got is None:
        assert got is None and want is None, f"parser {'refused' if got is None else 'accepted'}, ParseDict did not"
        return False
    assert got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)
    if not has_nan(want):
        assert got == want
    return True


# --------------------------------------------------------------------------- hand-written corpus

B64 = base64.b64encode(b"\x00\xfb\xff\xfe hello \x89PNG").decode()
B64URL = base64.urlsafe_b64encode(b"\x00\xfb\xff\xfe hello \x89PNG").decode()
TEXT = '{"parts": [{"text": "hi"}]}'

VALID_GENERATE = [
    "{}",
    '{"model": "models/echo", "contents": [{"role": "user", "parts": [{"text": "Hello: world"}]}]}',
    '{"contents": [{"parts": [{"text": "a"}, {"text": ""}, {"text": "ünïcode ✓ \\u00e9 \\ud83d\\ude00"}]}]}',
    # camelCase everywhere
    '{"systemInstruction": {"parts": [{"text": "be brief"}]}, "contents": [' + TEXT + '], "generationConfig": '
    '{"candidateCount": 1, "stopSequences": ["\\n\\n", "END"], "maxOutputTokens": 256, "temperature": 0.7, '
    '"topP": 0.95, "topK": 40, "responseMimeType": "application/json", "seed": -7}}',
    # snake_case everywhere
    '{"system_instruction": {"parts": [{"text": "be brief"}], "role": "system"}, "generation_config": '
    '{"candidate_count": 2, "stop_sequences": [], "max_output_tokens": 0, "temperature": 0, "top_p": 1, '
    '"top_k": 2147483647, "response_mime_type": "", "seed": -2147483648}}',
    # inline data: standard and URL-safe base64, with and without padding
    '{"contents": [{"parts": [{"inlineData": {"mimeType": "image/png", "data": "' + B64 + '"}}]}]}',
    '{"contents": [{"parts": [{"inline_data": {"mime_type": "image/png", "data": "' + B64URL + '"}}]}]}',
    '{"contents": [{"parts": [{"inlineData": {"data": "' + B64.rstrip("=") + '"}}, {"text": "what is it?"}]}]}',
    '{"contents": [{"parts": [{"inlineData": {"data": "YQ"}}, {"inlineData": {"data": ""}}, {"inlineData": {}}]}]}',
    '{"contents": [{"parts": [{"inlineData": {"data": "YQ==YWJj"}}]}]}',  # decoding stops at padding
    '{"contents": [{"parts": [{"inlineData": {"data": "Y Q=\\n="}}]}]}',  # non-alphabet bytes are skipped
    '{"contents": [{"parts": [{"inlineData": {"data": "YQ=a"}}, {"inlineData": {"data": "!!!!!"}}]}]}',
    '{"contents": [{"parts": [{"inlineData": {"data": "="}}, {"inlineData": {"data": "AB=C"}}]}]}',
    # null means unset, for scalars, messages, lists and a oneof's other member
    '{"model": null, "contents": null, "systemInstruction": null, "generationConfig": null}',
    '{"generationConfig": {"temperature": null, "topK": null, "stopSequences": null, "seed": null}}',
    '{"contents": [{"parts": [{"text": "a", "inlineData": null}, {"text": null, "inlineData": {"data": "YQ"}}]}]}',
    '{"contents": [{"parts": [{"text": null}], "role": null}]}',
    # present but empty messages; json_format reads "" and [] as empty messages too
    '{"systemInstruction": {}, "generationConfig": {}}',
    '{"systemInstruction": "", "generationConfig": [], "contents": ["", [], {}], '
    '"model": ""}',
    '{"contents": [{"parts": ["", []]}]}',
    '{"contents": [{"parts": [{"inlineData": ""}]}]}',
    # proto3 JSON numbers: integral floats, decimal strings, exponent strings, float strings
    '{"generationConfig": {"topK": 1.0, "seed": "-12", "candidateCount": "1e1", "maxOutputTokens": "2.0"}}',
    '{"generationConfig": {"topK": "+5", "seed": "1_000", "candidateCount": "\\t3", "maxOutputTokens": 1e3}}',
    '{"generationConfig": {"temperature": "0.5", "topP": " 1.5 ", "seed": -0}}',
    '{"generationConfig": {"temperature": "NaN"}}',
    '{"generationConfig": {"temperature": "Infinity", "topP": "-Infinity"}}',
    '{"generationConfig": {"temperature": "inf", "topP": "-nan"}}',
    '{"generationConfig": {"temperature": "1e39", "topP": "-1e39"}}',  # a string may overflow to infinity
    '{"generationConfig": {"temperature": 3.4028234663852886e38, "topP": -3.4028234663852886e38}}',
    '{"generationConfig": {"temperature": 1e-46, "topP": 1.401298464324817e-45}}',
    '{"generationConfig": {"temperature": 18446744073709551615, "topP": -9223372036854775808}}',
    '{"generationConfig": {"temperature": true, "topP": false}}',  # json_format takes booleans as 1.0 / 0.0
    '{"generationConfig": {"temperature": 0.1, "topP": 0.30000000000000004, "topK": 16384, "seed": 16383}}',
    '{"contents": [{"role": "user", "parts": [{"text": "' + "long " * 4000 + '"}]}]}',  # lengths over 16 KiB
]

INVALID_GENERATE = [
    # unknown fields at each level
    '{"contnets": []}',
    '{"Contents": []}',
    '{"contents": [{"parts": [], "author": "me"}]}',
    '{"contents": [{"parts": [{"text": "a"}, {"txt": "b"}]}]}',
    '{"contents": [{"parts": [{"inlineData": {"data": "YQ", "mimetype": "a/b"}}]}]}',
    '{"generationConfig": {"maxTokens": 5}}',
    '{"generationConfig": {"top_P": 0.5}}',
    '{"systemInstruction": {"text": "be brief"}}',
    # wrong JSON types
    '{"model": 5}',
    '{"model": ["a"]}',
    '{"model": true}',
    '{"contents": {}}',
    '{"contents": "hi"}',
    '{"contents": [5]}',
    '{"contents": [true]}',
    '{"contents": ["hi"]}',
    '{"contents": [["parts"]]}',
    '{"contents": [null]}',
    '{"contents": [{"parts": {"text": "a"}}]}',
    '{"contents": [{"parts": [{"text": 5}]}]}',
    '{"contents": [{"parts": [{"text": ["a"]}]}]}',
    '{"contents": [{"parts": [null]}]}',
    '{"contents": [{"role": 1}]}',
    '{"contents": [{"parts": [{"inlineData": "YQ"}]}]}',
    '{"contents": [{"parts": [{"inlineData": {"data": 5}}]}]}',
    '{"contents": [{"parts": [{"inlineData": {"data": []}}]}]}',
    '{"systemInstruction": 5}',
    '{"systemInstruction": "x"}',
    '{"systemInstruction": false}',
    '{"generationConfig": "temperature"}',
    '{"generationConfig": {"stopSequences": "END"}}',
    '{"generationConfig": {"stopSequences": [1]}}',
    '{"generationConfig": {"stopSequences": [null]}}',
    '{"generationConfig": {"temperature": "hot"}}',
    '{"generationConfig": {"temperature": "nan"}}',
    '{"generationConfig": {"temperature": [0.5]}}',
    '{"generationConfig": {"temperature": {}}}',
    '{"generationConfig": {"topK": true}}',
    '{"generationConfig": {"topK": "five"}}',
    '{"generationConfig": {"topK": [1]}}',
    '{"generationConfig": {"topK": " 1"}}',
    '{"generationConfig": {"topK": "0x10"}}',
    '{"generationConfig": {"topK": "inf"}}',
    '{"generationConfig": {"topK": "' + "9" * 5000 + '"}}',
    # ints: fractions and out of range; floats: beyond float32 as JSON numbers
    '{"generationConfig": {"topK": 1.5}}',
    '{"generationConfig": {"topK": "1.5"}}',
    '{"generationConfig": {"topK": 2147483648}}',
    '{"generationConfig": {"seed": -2147483649}}',
    '{"generationConfig": {"seed": "4294967296"}}',
    '{"generationConfig": {"candidateCount": 1e10}}',
    '{"generationConfig": {"maxOutputTokens": 18446744073709551615}}',
    '{"generationConfig": {"temperature": 3.5e38}}',
    '{"generationConfig": {"topP": -1e300}}',
    # bad base64
    '{"contents": [{"parts": [{"inlineData": {"data": "Y"}}]}]}',
    '{"contents": [{"parts": [{"inlineData": {"data": "YWJjZ"}}]}]}',
    '{"contents": [{"parts": [{"inlineData": {"data": "Y==="}}]}]}',
    '{"contents": [{"parts": [{"inlineData": {"data": "Y Q"}}]}]}',
    '{"contents": [{"parts": [{"inlineData": {"data": "aé"}}]}]}',
    # a oneof set twice
    '{"contents": [{"parts": [{"text": "a", "inlineData": {"data": "YQ"}}]}]}',
    '{"contents": [{"parts": [{"inline_data": {}, "text": ""}]}]}',
]

# Refused by the parser on purpose although ParseDict accepts some of them (see the module docstring).
BOTH_NAMES = [
    '{"systemInstruction": {}, "system_instruction": {}}',
    '{"systemInstruction": null, "system_instruction": {"parts": []}}',
    '{"generationConfig": {"topK": 1, "top_k": 2}}',
    '{"generationConfig": {"stopSequences": ["a"], "stop_sequences": ["b"]}}',
    '{"generationConfig": {"responseMimeType": "a", "response_mime_type": "b"}}',
    '{"contents": [{"parts": [{"inlineData": {"mimeType": "a/b", "mime_type": "c/d"}}]}]}',
    '{"contents": [{"parts": [{"inlineData": {"data": "YQ"}, "inline_data": {"mimeType": "a"}}]}]}',
]

VALID_EMBED = [
    "{}",
    '{"model": "models/embed", "content": ' + TEXT + "}",
    '{"content": ' + TEXT + ', "taskType": "TASK_TYPE_RETRIEVAL_DOCUMENT", "title": "Doc", "outputDimensionality": 8}',
    '{"content": ' + TEXT + ', "task_type": "TASK_TYPE_UNSPECIFIED", "title": "", "output_dimensionality": 0}',
    # Gemini's short names
    '{"taskType": "RETRIEVAL_DOCUMENT"}',
    '{"task_type": "RETRIEVAL_QUERY"}',
    '{"taskType": "SEMANTIC_SIMILARITY"}',
    '{"taskType": "FACT_VERIFICATION"}',
    # numbers, in range of the enum or not (proto3 enums are open), and json_format's int() of other forms
    '{"taskType": 2}',
    '{"taskType": 0}',
    '{"taskType": 99}',
    '{"taskType": -1}',
    '{"taskType": 2147483647}',
    '{"taskType": "5"}',
    '{"taskType": " 7"}',
    '{"taskType": "1_0"}',
    '{"taskType": 1.5}',
    '{"taskType": true}',
    '{"taskType": 4294967301}',  # upb wraps the lookup key to int32: 2**32 + 5 reads as 5
    '{"content": {}, "taskType": null, "title": null}',
    '{"content": "", "outputDimensionality": "64"}',
]

INVALID_EMBED = [
    '{"contents": []}',
    '{"content": [' + TEXT + "]}",
    '{"content": {"parts": [{"text": 1}]}}',
    '{"taskType": "RETRIEVAL"}',
    '{"taskType": "retrieval_document"}',
    '{"taskType": "TASK_TYPE_UNKNOWN"}',
    '{"taskType": "UNSPECIFIED"}',
    '{"taskType": "1.0"}',
    '{"taskType": 2147483648}',
    '{"taskType": -2147483649}',
    '{"taskType": 18446744073709551615}',
    '{"taskType": 1e300}',
    '{"taskType": []}',
    '{"taskType": {}}',
    '{"title": 5}',
    '{"outputDimensionality": 0.5}',
    '{"outputDimensionality": "x"}',
    '{"taskType": "RETRIEVAL_QUERY", "task_type": "RETRIEVAL_QUERY"}',
]


def _line(request: str, key: str = '"k"') -> bytes:
    return ('{"key": ' + key + ', "request": ' + request + "}").encode()


@pytest.mark.parametrize("request_json", VALID_GENERATE)
def test_valid_generate_lines_match_parsedict(request_json: str) -> None:
    assert check_line(_line(request_json), GEN, json.loads(request_json))


@pytest.mark.parametrize("request_json", INVALID_GENERATE + BOTH_NAMES)
def test_invalid_generate_lines_are_refused_like_parsedict(request_json: str) -> None:
    assert not check_line(_line(request_json), GEN, orjson.loads(request_json))


@pytest.mark.parametrize("request_json", VALID_EMBED)
def test_valid_embed_lines_match_parsedict(request_json: str) -> None:
    assert check_line(_line(request_json), EMB, json.loads(request_json))


@pytest.mark.parametrize("request_json", INVALID_EMBED)
def test_invalid_embed_lines_are_refused_like_parsedict(request_json: str) -> None:
    assert not check_line(_line(request_json), EMB, json.loads(request_json))


def test_parsedict_accepts_what_we_refuse_for_both_names() -> None:
    # Pins the documented difference: ParseDict keeps the later of two plain fields.
    assert reference(json.loads('{"generationConfig": {"stopSequences": ["a"], "stop_sequences": ["b"]}}'), GEN)
    assert reference(json.loads('{"taskType": "RETRIEVAL_DOCUMENT"}'), EMB) is None


def test_full_line_and_key() -> None:
    line = (b'{"key": "req-1", "request": {"model": "models/echo", "contents": [{"role": "user", '
            b'"parts": [{"text": "Hello"}]}], "generationConfig": {"temperature": 0.5, "maxOutputTokens": 64}}}\r\n')
    key, request = parse_generate_line(line)
    assert key == "req-1"
    assert request == GEN(
        model="models/echo",
        contents=[content_pb2.Content(role="user", parts=[content_pb2.Part(text="Hello")])],
        generation_config=content_pb2.GenerationConfig(temperature=0.5, max_output_tokens=64),
    )
    assert parse_generate_line(b'{"request": {}}') == ("", GEN())
    assert parse_generate_line(b'{"key": null, "request": {}}') == ("", GEN())
    assert parse_generate_line(b'{"request": {}, "key": ""}') == ("", GEN())
    key, embed = parse_embed_line(b'{"key":"e","request":{"taskType":"CLUSTERING","content":{"parts":[{"text":"x"}]}}}')
    assert (key, embed.task_type, embed.HasField("title")) == ("e", content_pb2.TASK_TYPE_CLUSTERING, False)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"\n",
        b"not json",
        b'{"key": "a", "request": {}',
        b'{"key": "a", "request": {}} x',
        b"[]",
        b'[{"request": {}}]',
        b"null",
        b"5",
        b'"request"',
        b"{}",
        b'{"key": "a"}',
        b'{"request": null}',
        b'{"request": []}',
        b'{"request": ""}',
        b'{"request": "{}"}',
        b'{"request": 5}',
        b'{"key": 5, "request": {}}',
        b'{"key": ["a"], "request": {}}',
        b'{"key": "a", "request": {}, "metadata": {}}',
        b'{"Request": {}}',
        b'{"request": {}, "requests": {}}',
        b'{"key": "\xff", "request": {}}',
        b'{"key": "\xc3(", "request": {}}',
        b'{"key": "\xed\xa0\x80", "request": {}}',  # a UTF-8-encoded surrogate
        b'{"key": "\\ud800", "request": {}}',  # an unpaired surrogate escape
        b'\xef\xbb\xbf{"request": {}}',
        b'{"request": {"generationConfig": {"temperature": NaN}}}',
        b'{"request": {"generationConfig": {"temperature": Infinity}}}',
        b'{"request": {"generationConfig": {"temperature": 1e400}}}',
        b"{'request': {}}",
    ],
)
def test_bad_lines_are_line_errors(line: bytes) -> None:
    with pytest.raises(LineError):
        parse_generate_line(line)
    with pytest.raises(LineError):
        parse_embed_line(line)


@pytest.mark.parametrize(
    "request_json",
    [
        '{"model": "a", "model": "b"}',
        '{"model": "a", "contents": [], "model": "a"}',
        '{"contents": [{"parts": [{"text": "a: b", "text": "c"}]}]}',
        '{"contents": [{"role": "user", "parts": [], "role": "model"}]}',
        '{"generationConfig": {"temperature": 1, "temperature" : 1}}',
        '{"generationConfig": {"seed": 1,\n"seed"\t:\r\n1}}',
        '{"contents": [{"parts": [{"text": "x\\": \\"y\\":"}]}], "model": "m", "model": "m"}',
        '{"model": "x", "model": "\\u003a"}',  # the survivor's colon is an escape: it must not hide the repeat
        '{"contents": [{"parts": [{"text": "\\u003A"}], "parts": []}]}',
        '{"contents": [{"parts": [{"text": ":", "text": "\\u003a"}]}]}',
    ],
)
def test_repeated_keys_are_refused_like_parse(request_json: str) -> None:
    with pytest.raises(json_format.ParseError):
        json_format.Parse(request_json, GEN())
    with pytest.raises(LineError, match="duplicate key"):
        parse_generate_line(_line(request_json))
    with pytest.raises(LineError, match="duplicate key"):
        parse_generate_line(b'{"key": "a", "key": "b", "request": {}}')


@pytest.mark.parametrize(
    "request_json",
    [
        '{"contents": [{"parts": [{"text": "Q: what? A: this. URL: https://x.y/z"}]}]}',
        '{"contents": [{"parts": [{"text": "quote then colon: \\": and \\" : and \\"\\t:"}]}]}',
        '{"contents" : [{"parts" :[{"text"\t:"a :b"}]}] ,\n "model"\r\n:\n"m"}',
        '{"contents": [{"parts": [{"text": "{\\"a\\": 1, \\"a\\": 2}"}]}]}',
        '{"model": "\\u003a:", "contents": [{"role": "a:b", "parts": [{"text": "\\u003A"}, {"text": "::"}]}]}',
        '{"generationConfig": {"stopSequences": [":", "\\u003a"], "responseMimeType": "a:b"}}',
        '{"contents": [{"parts": [{"inlineData": {"mimeType": "x:y", "data": "YQ:=="}}]}]}',
    ],
)
def test_colons_and_whitespace_do_not_look_like_repeated_keys(request_json: str) -> None:
    assert check_line(_line(request_json), GEN, json.loads(request_json))
    assert parse_generate_line(_line(request_json))[1] == json_format.Parse(request_json, GEN())
    assert parse_generate_line(_line(request_json, key='"k:\\u003a:"'))[0] == "k:::"


@pytest.mark.parametrize(
    ("request_json", "message"),
    [
        ('{"contents": [{"parts": [{"text": "a"}, {"txt": "b"}]}]}',
         'request.contents[0].parts[1]: unknown field "txt"'),
        ('{"generationConfig": {"topK": 1.5}}', "request.generationConfig.topK: expected an integer, got 1.5"),
        ('{"generation_config": {"seed": 2147483648}}', "request.generation_config.seed: integer out of range"),
        ('{"contents": [{}, {"parts": [null]}]}', "request.contents[1].parts[0]: null is not allowed in a list"),
        ('{"contents": [{"parts": [{"inlineData": {"data": "Y"}}]}]}',
         'request.contents[0].parts[0].inlineData.data: invalid base64: "Y"'),
        ('{"contents": [{"parts": [{"text": "a", "inlineData": {}}]}]}',
         'request.contents[0].parts[0]: only one of "text" and "inlineData" may be set'),
        ('{"generationConfig": {"topK": 1, "top_k": 1}}',
         'request.generationConfig: field given twice, as "topK" and "top_k"'),
        ('{"model": ["m"]}', "request.model: expected a string, got a list"),
        ('{"systemInstruction": 5}', "request.systemInstruction: expected an object, got 5"),
    ],
)
def test_messages_name_the_field(request_json: str, message: str) -> None:
    with pytest.raises(LineError) as caught:
        parse_generate_line(_line(request_json))
    assert str(caught.value).startswith(message)


def test_top_level_messages() -> None:
    cases = {
        b'{"request": {}, "extra": 1}': 'unknown top-level field "extra"',
        b'{"key": "a"}': '"request" is missing',
        b'{"request": []}': '"request" must be an object, got a list',
        b'{"key": 1, "request": {}}': '"key" must be a string, got 1',
        b"[]": "a line must be a JSON object, got a list",
        b"{": "not valid JSON",
        b'{"request": {"taskType": "X"}}': 'request: unknown field "taskType"',
    }
    for line, message in cases.items():
        with pytest.raises(LineError) as caught:
            parse_generate_line(line)
        assert str(caught.value).startswith(message), (line, str(caught.value))
    with pytest.raises(LineError, match=r'^request\.taskType: unknown enum value "X" for TaskType'):
        parse_embed_line(b'{"request": {"taskType": "X"}}')
    assert issubclass(LineError, ValueError)


def test_field_kinds_without_a_fast_route_fall_back_to_parsedict() -> None:
    # FieldOptions has bools, enums and repeated messages of its own; bools have no fast route.
    spec = jsonl._spec_for(descriptor_pb2.FieldOptions.DESCRIPTOR, {})
    options_type = descriptor_pb2.FieldOptions
    key, options = jsonl._parse(b'{"key": "f", "request": {"deprecated": true, "ctype": "CORD"}}', spec,
                                options_type, options_type.FromString)
    assert (key, options) == ("f", descriptor_pb2.FieldOptions(deprecated=True, ctype=descriptor_pb2.FieldOptions.CORD))
    with pytest.raises(LineError, match=r"^request: "):
        jsonl._parse(b'{"request": {"deprecated": 1}}', spec, options_type, options_type.FromString)
    with pytest.raises(LineError, match="duplicate key"):
        jsonl._parse(b'{"request": {"deprecated": true, "deprecated": false}}', spec, options_type,
                     options_type.FromString)


# --------------------------------------------------------------------------- property test

json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
)
any_json = st.recursive(
    json_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def mostly(good: st.SearchStrategy[Any], *odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` about four times in five, else one of ``odd`` or any JSON value."""
    return st.integers(0, 4).flatmap(lambda n: good if n else st.one_of(*odd, any_json))


def _int_strings(numbers: st.SearchStrategy[int]) -> st.SearchStrategy[str]:
    return numbers.map(str) | numbers.map(lambda n: f"{n}.0") | numbers.map(lambda n: f"{n:e}")


int32_values = mostly(
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**63), 2**64 - 1),
    st.integers(-(2**31), 2**31 - 1).map(float),
    st.floats(-1e12, 1e12),
    _int_strings(st.integers(-(2**33), 2**33)),
    st.sampled_from(["", " 1", "1 ", "\t2", "+3", "-0", "1_0", "0x1", "1.5", "1e3", "inf", "NaN", "٣", "one"]),
)
float_values = mostly(
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(2**63), 2**64 - 1),
    st.floats().map(repr),
    st.sampled_from(["NaN", "nan", "-nan", "Infinity", "-Infinity", "inf", "-INF", " 1.5 ", "1e39", "1_0.5", "x"]),
)
text_values = mostly(st.text(max_size=12), st.integers(-(2**63), 2**64 - 1), st.lists(st.text(max_size=2), max_size=2))


def _base64_forms(data: bytes) -> st.SearchStrategy[str]:
    standard = base64.b64encode(data).decode()
    url = base64.urlsafe_b64encode(data).decode()
    return st.sampled_from([standard, url, standard.rstrip("="), url.rstrip("="), standard + "=", "=" + standard])


bytes_values = mostly(
    st.binary(max_size=12).flatmap(_base64_forms),
    st.text(alphabet="ABCDEFGHabcdefgh0123456789+/-_= \n!", max_size=10),
)
task_type_values = mostly(
    st.sampled_from([*SHORT_TASK_TYPES, *SHORT_TASK_TYPES.values(), "TASK_TYPE_UNSPECIFIED"]),
    st.integers(-(2**33), 2**33),
    st.floats(-1e10, 1e10),
    _int_strings(st.integers(-10, 10)),
    st.sampled_from(["UNSPECIFIED", "clustering", " 7", "1_0", "FOO", ""]),
)
SCALAR_VALUES = {
    descriptor.FieldDescriptor.TYPE_STRING: text_values,
    descriptor.FieldDescriptor.TYPE_BYTES: bytes_values,
    descriptor.FieldDescriptor.TYPE_INT32: int32_values,
    descriptor.FieldDescriptor.TYPE_FLOAT: float_values,
    descriptor.FieldDescriptor.TYPE_ENUM: task_type_values,
}
UNKNOWN_KEYS = st.sampled_from(["txt", "Text", "", "parts ", "PARTS", "mimetype", "maxTokens", "@type", "[x]"])


def value_for(field: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.message_type is not None:
        message = request_shaped(field.message_type)
        item: st.SearchStrategy[Any] = mostly(message, st.just(""), st.just([]), st.just(None))
        if not field.is_repeated:
            return item
    else:
        item = SCALAR_VALUES[field.type]
        if not field.is_repeated:
            return item
        item = mostly(text_values, st.none())
    return mostly(st.lists(item, max_size=3), st.none())


@st.composite
def _request_shaped(draw: st.DrawFn, message: descriptor.Descriptor) -> dict[str, Any]:
    items: list[tuple[str, Any]] = []
    for field in message.fields:
        if not draw(st.booleans()):
            continue
        naming = draw(st.integers(0, 19))
        names = [field.json_name, field.name] if naming == 0 else [field.json_name if naming % 2 else field.name]
        for name in dict.fromkeys(names):
            items.append((name, draw(value_for(field))))
    if draw(st.integers(0, 9)) == 0:
        items.append((draw(UNKNOWN_KEYS), draw(any_json)))
    return dict(draw(st.permutations(items)))


_STRATEGIES: dict[str, st.SearchStrategy[dict[str, Any]]] = {}


def request_shaped(message: descriptor.Descriptor) -> st.SearchStrategy[dict[str, Any]]:
    """Random objects shaped like ``message`` in proto JSON, mostly valid, sometimes mutated at any level."""
    if message.full_name not in _STRATEGIES:
        _STRATEGIES[message.full_name] = _request_shaped(message)
    return _STRATEGIES[message.full_name]


PROPERTY = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(request=request_shaped(GEN.DESCRIPTOR), key=mostly(st.text(max_size=8), st.none()))
@example(request={"contents": [{"parts": [{"text": "x"}]}]}, key=None)
def test_generate_requests_match_parsedict(request: dict[str, Any], key: Any) -> None:
    check(request, GEN, key)


@PROPERTY
@given(request=request_shaped(EMB.DESCRIPTOR))
def test_embed_requests_match_parsedict(request: dict[str, Any]) -> None:
    check(request, EMB)


@settings(max_examples=300, deadline=None)
@given(request=any_json)
def test_arbitrary_json_requests_match_parsedict(request: Any) -> None:
    if isinstance(request, dict):
        check(request, GEN)
        check(request, EMB)
    else:
        with pytest.raises(LineError):
            parse_generate_line(orjson.dumps({"request": request}))


@PROPERTY
@given(content=request_shaped(content_pb2.Content.DESCRIPTOR))
@example(content={"parts": [{"text": "a: b"}, {"text": ""}], "role": "user:x"})
@example(content={"parts": [{"text": "x" * 20000}]})
def test_content_shortcut_agrees_with_the_general_route(content: dict[str, Any]) -> None:
    spec = jsonl._SPECS[content_pb2.Content.DESCRIPTOR.full_name]
    assert spec.fast is not None
    fast_tally, tally = [0, 0], [0, 0]
    wire = spec.fast(content, fast_tally)
    if wire is None:
        assert fast_tally == [0, 0]
        return
    assert content_pb2.Content.FromString(wire) == content_pb2.Content.FromString(jsonl._encode(spec, content, tally))
    assert fast_tally == tally


def _emit(value: Any, target: object, repeated: str, early: Any, escape: bool, space: str) -> str:
    """JSON text of ``value``; in the object ``target``, key ``repeated`` comes twice, first with ``early``."""

    def text(s: str) -> str:
        out = json.dumps(s, ensure_ascii=False)
        return out.replace(":", "\\u003a") if escape else out  # a colon inside a string, spelled as an escape

    def emit(v: Any) -> str:
        if isinstance(v, dict):
            items = [(k, x) for key, x in v.items() for k, x in ([(key, early)] if v is target and key == repeated
                                                                 else []) + [(key, x)]]
            return "{" + ",".join(f"{text(k)}{space}:{space}{emit(x)}" for k, x in items) + "}"
        if isinstance(v, list):
            return "[" + ",".join(emit(x) for x in v) + "]"
        return text(v) if isinstance(v, str) else json.dumps(v)

    return emit(value)


def _objects(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        return [value] + [o for v in value.values() for o in _objects(v)]
    if isinstance(value, list):
        return [o for v in value for o in _objects(v)]
    return []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data(), request=request_shaped(GEN.DESCRIPTOR), key=st.text(max_size=4),
       escape=st.booleans(), space=st.sampled_from(["", " ", "\t", "\r\n "]))
def test_a_repeated_key_is_found_wherever_it_is(
    data: st.DataObject, request: dict[str, Any], key: str, escape: bool, space: str
) -> None:
    want = reference(request, GEN)
    assume(want is not None and not gives_both_names(request))
    assert want is not None
    line = {"key": key, "request": request}
    target = data.draw(st.sampled_from([o for o in _objects(line) if o]))
    repeated = data.draw(st.sampled_from(sorted(target)))
    early = data.draw(any_json | st.text(alphabet=':"\\ab', max_size=4))
    # Written once each, the keys parse to the same request, whatever the spacing and escapes.
    got_key, got = parse_generate_line(_emit(line, None, "", None, escape, space).encode())
    assert (got_key, got.SerializeToString(deterministic=True)) == (key, want.SerializeToString(deterministic=True))
    with pytest.raises(LineError, match="duplicate key"):
        parse_generate_line(_emit(line, target, repeated, early, escape, space).encode())


# --------------------------------------------------------------------------- the plain-line route

plain_text = st.text(max_size=12) | st.sampled_from(["a: b", "x" * 200, "é" * 70, "\\u003a", ""])
plain_content = st.fixed_dictionaries(
    {"parts": st.lists(mostly(st.fixed_dictionaries({"text": plain_text}), st.just({})), max_size=3)},
    optional={"role": st.sampled_from(["", "user", "model", "system", "User", "user:x"])},
)
plain_request = mostly(
    st.fixed_dictionaries({"contents": st.lists(plain_content, max_size=3)}),
    request_shaped(GEN.DESCRIPTOR),
    st.fixed_dictionaries({"contents": st.lists(plain_content, max_size=2), "model": st.just("models/echo")}),
)


def _agrees_with_the_general_route(line: bytes) -> bool:
    """If the plain route takes ``line``, the general route accepts it,
    validation passes, and the bytes are SerializeToString()'s. True when
    the plain route took it."""
    plain = jsonl.plain_generate_payload(line)
    if plain is None:
        return False
    key, message = parse_generate_line(line)
    violations = Violations()
    validate_generate_request(message, "request", violations)
    assert violations.items == []
    assert plain == (key, message.SerializeToString())
    return True


@PROPERTY
@given(request=plain_request, key=mostly(st.text(max_size=8), st.none(), st.just(7)), spaced=st.booleans())
def test_the_plain_route_takes_only_valid_lines_with_identical_bytes(request: Any, key: Any, spaced: bool) -> None:
    line = {"request": request} if key is None else {"key": key, "request": request}
    text = json.dumps(line) if spaced else orjson.dumps(line).decode()
    took = _agrees_with_the_general_route(text.encode())
    # Every plain line takes the route (or the speedup is gone), bar colons
    # spelled as escapes, which the quick duplicate-key check cannot count.
    assert took == _plain_shaped(request, key) or "\\u003a" in text


def _plain_shaped(request: Any, key: Any) -> bool:
    def text_part(part: Any) -> bool:
        return type(part) is dict and set(part) == {"text"} and type(part["text"]) is str

    def content(c: Any) -> bool:
        return (type(c) is dict and set(c) <= {"parts", "role"} and type(c.get("parts")) is list and bool(c["parts"])
                and all(map(text_part, c["parts"])) and c.get("role", "") in ("", "user", "model"))

    return (key is None or type(key) is str) and type(request) is dict and set(request) == {"contents"} and (
        type(request["contents"]) is list and bool(request["contents"]) and all(map(content, request["contents"])))


@pytest.mark.parametrize("line", [
    b'{"key": "a", "key": "b", "request": {"contents": [{"parts": [{"text": "x"}]}]}}',
    b'{"request": {"contents": [{"parts": [{"text": "x"}]}], "contents": [{"parts": [{"text": "y"}]}]}}',
    b'{"request": {"contents": [{"parts": [{"text": "x", "text": "y"}]}]}}',
    b'{"request": {"contents": [{"role": "user", "parts": [{"text": "x"}], "role": "model"}]}}',
    b'{"key": "a\\u003a", "request": {"contents": [{"parts": [{"text": "x"}], "parts": []}]}}',
    b'{"request": {"contents": [{"parts": [{"text": "x"}]}]}',
    b'{"request": {"contents": [{"parts": [{"text": "x"}]}]}} trailing',
    b'\xff{"request": {}}',
    b'{"request": {"contents": [{"parts": [{"text": "x"}], "role": "system"}]}}',
    b'{"request": {"contents": [{"parts": []}]}}',
    b'{"request": {"contents": []}}',
])
def test_the_plain_route_leaves_bad_lines_to_the_general_route(line: bytes) -> None:
    assert jsonl.plain_generate_payload(line) is None


def test_the_plain_route_knows_the_roles_validation_accepts() -> None:
    assert jsonl._PLAIN_ROLES == validate._ROLES
