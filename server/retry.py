"""One backoff policy and one Retry-After reader for every retry loop of the server.

The executor (backend calls), the webhook dispatcher (deliveries) and the
HTTP backends all wait the same way between attempts: exponential from
``initial_s``, doubling, capped at ``max_s``, with jitter, and never less
than what the other side asked for in ``Retry-After`` / ``retry-after-ms``
(itself capped, so a hostile or broken server cannot park us for a day).
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Backoff", "parse_retry_after", "retry_after_from_headers"]


@dataclass(frozen=True)
class Backoff:
    """Jittered exponential backoff.

    Attributes:
        initial_s: the delay before the second attempt, seconds.
        max_s: cap on one computed delay, seconds.
        jitter: share of the delay drawn at random: the delay is uniform in
            ``[d * (1 - jitter), d]``; 0.5 spreads a thundering herd, 0.2
            keeps successive gaps growing.
        max_hint_s: cap on an honoured Retry-After hint, seconds.
    """

    initial_s: float = 0.2
    max_s: float = 10.0
    jitter: float = 0.5
    max_hint_s: float = 60.0

    def delay(self, attempt: int, retry_after_s: float | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based).

        Args:
            attempt: how many attempts have failed so far, at least 1.
            retry_after_s: the other side's hint, if it gave one.
            rng: a random source (tests); the module's by default.
        """
        base = min(self.max_s, self.initial_s * 2.0 ** max(0, attempt - 1))
        draw = (rng or random).uniform(base * (1.0 - self.jitter), base)
        if retry_after_s is not None:
            draw = max(draw, min(retry_after_s, self.max_hint_s))
        return draw


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    Args:
        value: the header, or None.
        now: the current Unix time (for tests); defaults to ``time.time()``.

    Returns:
        Non-negative seconds, or None when absent or unreadable.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None  # HTTP dates are GMT; a zoneless one is malformed
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def retry_after_from_headers(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The wait a response asks for: ``retry-after-ms`` (OpenAI) first, then ``Retry-After``.

    Args:
        headers: response headers; looked up case-insensitively when the
            mapping is (aiohttp's is), else by the lower-case and canonical names.
        now: the current Unix time (for tests).

    Returns:
        Non-negative seconds, or None when neither header is present and readable.
    """
    ms = headers.get("retry-after-ms") or headers.get("Retry-After-Ms")
    if ms is not None:
        try:
            value = float(ms.strip())
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return max(0.0, value / 1000.0)
    return parse_retry_after(headers.get("Retry-After") or headers.get("retry-after"), now)
