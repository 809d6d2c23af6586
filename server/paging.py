"""Opaque, signed page tokens and page-size clamping for List RPCs.

A token carries the keyset position of the last item returned, bound by HMAC
to a caller-built scope (tenant, collection, filter...), so a client can
neither forge a position nor reuse a token with a different query.

Wire layout, URL-safe base64 without padding::

    version (1) | scope tag (16) | JSON position | MAC (16)

The scope tag is an HMAC of the scope alone; keeping it separate from the MAC
over the whole token lets a reused token get a specific error message instead
of the generic "tampered" one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import Final

import orjson

__all__ = ["PageTokenError", "PageTokens", "clamp_page_size"]

MAX_TOKEN_LENGTH: Final = 1000
_VERSION: Final = 1
_TAG_BYTES: Final = 16
_MIN_SECRET_BYTES: Final = 16
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
# Distinct prefixes keep the two HMAC uses from ever standing in for each other.
_SCOPE_DOMAIN: Final = b"longbatch.page-token.scope\x00"
_MAC_DOMAIN: Final = b"longbatch.page-token.mac\x00"

_INVALID: Final = "page token is malformed or was not issued by this server"


class PageTokenError(ValueError):
    """A page token that is malformed, tampered with, or used with another query."""


class PageTokens:
    """Encodes and verifies page tokens under one server secret.

    Args:
        secret: HMAC key, at least 16 bytes; tokens stay valid only as long as
            it does, so a restart with a new secret invalidates open listings.

    Raises:
        ValueError: The secret is shorter than 16 bytes.
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) < _MIN_SECRET_BYTES:
            raise ValueError(f"page token secret must be at least {_MIN_SECRET_BYTES} bytes")
        self._secret = bytes(secret)

    def _scope_tag(self, scope: str) -> bytes:
        # surrogatepass: a scope built from odd client text must not raise here.
        data = _SCOPE_DOMAIN + scope.encode("utf-8", "surrogatepass")
        return hmac.digest(self._secret, data, hashlib.sha256)[:_TAG_BYTES]

    def _mac(self, body: bytes) -> bytes:
        return hmac.digest(self._secret, _MAC_DOMAIN + body, hashlib.sha256)[:_TAG_BYTES]

    def encode(self, scope: str, position: Sequence[int | str]) -> str:
        """Build the token for resuming after ``position`` within ``scope``.

        Args:
            scope: What the token is bound to, e.g. tenant, collection and filter.
            position: Keyset values of the last item returned (64-bit ints or strings).

        Returns:
            An opaque URL-safe token of at most 1,000 characters.

        Raises:
            TypeError: A position item is not an int or str (bool counts as neither).
            ValueError: An int is outside 64 bits, or the token would be too long.
        """
        items = list(position)
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int | str):
                raise TypeError(f"page token position items must be int or str, not {type(item).__name__}")
            if isinstance(item, int) and not _INT64_MIN <= item <= _INT64_MAX:
                raise ValueError("page token position ints must fit in 64 bits")
        body = bytes([_VERSION]) + self._scope_tag(scope) + orjson.dumps(items)
        token = base64.urlsafe_b64encode(body + self._mac(body)).rstrip(b"=").decode("ascii")
        # A token decode() would refuse is a bug here, not at the client.
        if len(token) > MAX_TOKEN_LENGTH:
            raise ValueError(f"page token would exceed {MAX_TOKEN_LENGTH} characters")
        return token

    def decode(self, token: str, scope: str) -> tuple[int | str, ...]:
        """Verify ``token`` against ``scope`` and return its position.

        An empty token means "first page" and must be handled by the caller
        before calling this.

        Args:
            token: The page token the client sent.
            scope: The scope of the current request, built as for :meth:`encode`.

        Returns:
            The position passed to :meth:`encode`, as a tuple.

        Raises:
            PageTokenError: The token is malformed, too long, tampered with, or
                was issued for another scope.
        """
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH:
            raise PageTokenError(_INVALID)
        # urlsafe_b64decode silently skips foreign characters, so check first.
        if not _TOKEN_RE.fullmatch(token):
            raise PageTokenError(_INVALID)
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise PageTokenError(_INVALID) from None
        # Reject non-canonical spellings (stray low bits) so one token has one form.
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != token:
            raise PageTokenError(_INVALID)
        if len(raw) < 1 + 2 * _TAG_BYTES + 2:
            raise PageTokenError(_INVALID)
        body, mac = raw[:-_TAG_BYTES], raw[-_TAG_BYTES:]
        if body[0] != _VERSION:
            raise PageTokenError(_INVALID)
        if not hmac.compare_digest(mac, self._mac(body)):
            raise PageTokenError(_INVALID)
        if not hmac.compare_digest(body[1 : 1 + _TAG_BYTES], self._scope_tag(scope)):
            raise PageTokenError("page token does not match this request's filter/collection")
        try:
            items = orjson.loads(body[1 + _TAG_BYTES :])
        except orjson.JSONDecodeError:
            raise PageTokenError(_INVALID) from None
        # Only reachable with a leaked secret or a future format, but cheap.
        if not isinstance(items, list) or not all(
            isinstance(item, int | str) and not isinstance(item, bool) for item in items
        ):
            raise PageTokenError(_INVALID)
        return tuple(items)


def clamp_page_size(page_size: int, default: int = 50, maximum: int = 1000) -> int:
    """Turn a request's ``page_size`` into the number of items to return.

    Args:
        page_size: The client's value; 0 means "server's choice".
        default: Used when ``page_size`` is 0.
        maximum: Upper bound; larger requests are silently capped, per AIP-158.

    Returns:
        The page size to use, between 1 and ``maximum`` for sane arguments.

    Raises:
        ValueError: ``page_size`` is negative.
    """
    if page_size < 0:
        raise ValueError("page_size must not be negative")
    return min(page_size or default, maximum)


def read_page_request(
    tokens: PageTokens, page_size: int, page_token: str, scope: str, expect: type[int] | type[str] = int
) -> tuple[int, int | str | None]:
    """Validate a List request's paging fields for the RPC layer.

    Returns:
        The page size to use and the position (of type ``expect``) after
        which the page starts, or None for the first page.

    Raises:
        InvalidArgument: a negative ``page_size`` or a bad ``page_token``, with
            the field named in the violations.
    """
    from .errors import InvalidArgument  # paging stays usable without the RPC error types

    try:
        size = clamp_page_size(page_size)
    except ValueError as e:
        raise InvalidArgument(str(e), violations=[("page_size", "must not be negative")]) from None
    if not page_token:
        return size, None
    try:
        position = tokens.decode(page_token, scope)
    except PageTokenError as e:
        raise InvalidArgument(f"invalid page_token: {e}", reason="INVALID_PAGE_TOKEN",
                              violations=[("page_token", str(e))]) from None
    if len(position) != 1 or not isinstance(position[0], expect):
        raise InvalidArgument("invalid page_token", reason="INVALID_PAGE_TOKEN",
                              violations=[("page_token", "malformed")])
    return size, position[0]
