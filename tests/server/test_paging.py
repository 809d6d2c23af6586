"""Tests for signed page tokens and page-size clamping."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longbatch.server.paging import PageTokenError, PageTokens, clamp_page_size

SECRET = b"0123456789abcdef0123456789abcdef"
SCOPE = "tenant-a/batches/state = RUNNING"


@pytest.fixture
def tokens() -> PageTokens:
    return PageTokens(SECRET)


@pytest.mark.parametrize(
    "position",
    [(), (1767225600000000, "batches/abc"), (-(2**63), 2**63 - 1), ("", "ünïcode ✓", 0), (7,)],
)
def test_round_trip(tokens: PageTokens, position: tuple[int | str, ...]) -> None:
    token = tokens.encode(SCOPE, position)
    assert all(c.isalnum() or c in "-_" for c in token)
    assert tokens.decode(token, SCOPE) == position
    # Same secret, fresh instance: tokens survive a restart.
    assert PageTokens(SECRET).decode(token, SCOPE) == position


def test_position_is_not_plain_text_in_scope(tokens: PageTokens) -> None:
    # The scope is bound by MAC, not stored, so filters do not leak into URLs.
    raw = base64.urlsafe_b64decode(tokens.encode(SCOPE, [1]) + "==")
    assert SCOPE.encode() not in raw


def test_wrong_scope(tokens: PageTokens) -> None:
    token = tokens.encode(SCOPE, [1, "x"])
    with pytest.raises(PageTokenError, match="does not match this request's filter/collection"):
        tokens.decode(token, SCOPE + " ")


def test_other_secret(tokens: PageTokens) -> None:
    token = tokens.encode(SCOPE, [1])
    with pytest.raises(PageTokenError, match="malformed"):
        PageTokens(b"another secret, 16+ bytes").decode(token, SCOPE)


def test_every_tampered_byte_is_rejected(tokens: PageTokens) -> None:
    raw = base64.urlsafe_b64decode(tokens.encode(SCOPE, [42, "batches/b"]) + "==")
    for i in range(len(raw)):
        for flip in (0x01, 0x80):
            forged = bytearray(raw)
            forged[i] ^= flip
            token = base64.urlsafe_b64encode(bytes(forged)).rstrip(b"=").decode()
            with pytest.raises(PageTokenError):
                tokens.decode(token, SCOPE)


def test_truncated(tokens: PageTokens) -> None:
    token = tokens.encode(SCOPE, [42, "batches/b"])
    for end in range(len(token)):
        with pytest.raises(PageTokenError):
            tokens.decode(token[:end], SCOPE)
    with pytest.raises(PageTokenError):
        tokens.decode(token + "A", SCOPE)


def test_non_canonical_and_padded_spellings(tokens: PageTokens) -> None:
    token = tokens.encode(SCOPE, [1])
    for variant in (token + "=", token + "==", " " + token, token.replace("-", "+").replace("_", "/")):
        if variant != token:
            with pytest.raises(PageTokenError):
                tokens.decode(variant, SCOPE)


def test_too_long(tokens: PageTokens) -> None:
    with pytest.raises(PageTokenError):
        tokens.decode("A" * 1001, SCOPE)
    with pytest.raises(ValueError, match="exceed"):
        tokens.encode(SCOPE, ["x" * 800])


def test_bad_encode_arguments(tokens: PageTokens) -> None:
    with pytest.raises(TypeError):
        tokens.encode(SCOPE, [True])
    with pytest.raises(TypeError):
        tokens.encode(SCOPE, [1.5])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="64 bits"):
        tokens.encode(SCOPE, [2**63])


def test_short_secret() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        PageTokens(b"short")


def test_not_a_string(tokens: PageTokens) -> None:
    with pytest.raises(PageTokenError):
        tokens.decode(b"abc", SCOPE)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=1100), st.binary(max_size=200).map(lambda b: base64.urlsafe_b64encode(b).decode())))
def test_garbage_only_raises_page_token_error(garbage: str) -> None:
    tokens = PageTokens(SECRET)
    with pytest.raises(PageTokenError):
        tokens.decode(garbage, SCOPE)


@settings(max_examples=100, deadline=None)
@given(
    st.text(max_size=50),
    st.lists(st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=20)), max_size=5),
)
def test_round_trip_property(scope: str, position: list[int | str]) -> None:
    tokens = PageTokens(SECRET)
    assert tokens.decode(tokens.encode(scope, position), scope) == tuple(position)


@pytest.mark.parametrize(
    ("page_size", "expected"),
    [(0, 50), (1, 1), (50, 50), (999, 999), (1000, 1000), (1001, 1000), (10**9, 1000)],
)
def test_clamp_page_size(page_size: int, expected: int) -> None:
    assert clamp_page_size(page_size) == expected


def test_clamp_page_size_custom_and_negative() -> None:
    assert clamp_page_size(0, default=10, maximum=100) == 10
    assert clamp_page_size(500, default=10, maximum=100) == 100
    with pytest.raises(ValueError, match="page_size must not be negative"):
        clamp_page_size(-1)
