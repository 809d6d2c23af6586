"""The trailer budget of errors: every gRPC client must be able to read them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from longbatch.server.edge import MAX_DETAILS_BYTES, MAX_MESSAGE_BYTES, fit_trailers
from longbatch.server.errors import make_status

from support import unpack_status


def _encoded_size(message: str) -> int:
    return sum(1 if " " <= ch <= "~" and ch != "%" else 3 * len(ch.encode()) for ch in message)


def test_a_status_within_budget_is_left_alone() -> None:
    status = make_status(3, "bad", "INVALID_ARGUMENT", [("a", "is required")] * 20, {"k": "v"})
    assert fit_trailers(status) is status


@given(
    violations=st.lists(st.tuples(st.text(max_size=300), st.text(max_size=300)), max_size=150),
    message=st.text(max_size=3000),
)
def test_fitted_statuses_fit_and_keep_a_prefix_of_the_violations(
    violations: list[tuple[str, str]], message: str
) -> None:
    status = make_status(3, message, "INVALID_ARGUMENT", violations, {"k": "v"})
    fitted = fit_trailers(status)
    assert fitted.ByteSize() <= MAX_DETAILS_BYTES
    assert _encoded_size(fitted.message) <= MAX_MESSAGE_BYTES
    assert message.startswith(fitted.message.removesuffix("..."))
    assert fitted.code == 3
    info, kept = unpack_status(fitted)
    metadata = info.metadata
    assert metadata["k"] == "v"
    assert kept == violations[: len(kept)]
    if len(kept) < len(violations):
        assert metadata["violations_shown"] == str(len(kept))
    else:
        assert "violations_shown" not in metadata


def test_a_single_violation_over_budget_is_dropped_and_counted() -> None:
    fitted = fit_trailers(make_status(3, "bad", "INVALID_ARGUMENT", [("f", "x" * 10_000)]))
    assert fitted.ByteSize() <= MAX_DETAILS_BYTES
    info, kept = unpack_status(fitted)
    metadata = info.metadata
    assert kept == [] and metadata["violations_shown"] == "0"
