"""The JSON line's encoder, built once: the same text as ``json.dumps``, errors as before."""

from __future__ import annotations

import json
from typing import Any

import pytest

from saslauthd_oidc.service.logs import _json_fallback, _JsonLine
from tests.support import token

JWT = token()


def _want(event: dict[str, Any]) -> str:
    return json.dumps(event, default=_json_fallback)


class _Odd:
    def __structlog__(self) -> str:
        return "odd"


class _Broken:
    def __structlog__(self) -> str:
        raise ValueError("cannot say")


@pytest.mark.parametrize(
    "event",
    [
        {"event": "x", "n": 1, "f": 0.1, "inf": float("inf"), "none": None, "yes": True},
        {"event": "päß ✓", "nested": {"a": [1, "b", {"c": None}]}, "odd": _Odd()},
        {"event": "y", "deep": [f"Bearer {JWT}"], "key eyJhbGciOiJ": 1},  # not top-level
    ],
)
def test_the_prebuilt_encoder_writes_what_json_dumps_writes(event: dict[str, Any]) -> None:
    line = _JsonLine()
    for _ in range(2):  # the second time with the encoder the first one left
        got = json.loads(line(None, "info", dict(event)))
        got.pop("timestamp")
        assert json.dumps(got) == json.dumps(json.loads(_want({**event, "level": "info"})))


def test_after_an_encoding_that_failed_the_next_line_is_encoded_as_usual() -> None:
    line = _JsonLine()
    box: dict[str, Any] = {"bad": _Broken()}
    with pytest.raises(ValueError, match="cannot say"):
        line(None, "info", {"event": "x", "box": box})
    box["bad"] = 1
    # the dict that was being encoded when it failed is no "circular reference" now
    got = json.loads(line(None, "info", {"event": "y", "a": box, "b": [box]}))
    assert (got["a"], got["b"]) == ({"bad": 1}, [{"bad": 1}])
    looped: list[Any] = []
    looped.append(looped)
    with pytest.raises(ValueError, match="Circular reference"):
        line(None, "info", {"event": "z", "loop": looped})
    assert json.loads(line(None, "info", {"event": "w"}))["event"] == "w"


def test_a_token_in_a_top_level_value_is_redacted_and_elsewhere_left_as_before() -> None:
    line = _JsonLine()
    got = json.loads(line(None, "info", {"event": "x", "detail": f"Bearer {JWT}", "n": [JWT]}))
    assert JWT not in got["detail"] and got["detail"].startswith("Bearer <token ")
    assert got["n"] == [JWT]  # nested values were never scanned (redact_secrets neither)


def test_a_dict_another_line_is_encoding_is_no_circular_reference() -> None:
    """The prebuilt encoder's markers are shared: another thread's line may be inside
    the same dict; the line is then encoded with markers of its own."""
    line = _JsonLine()
    box = {"k": "v"}
    encoder: Any = line._c_encode
    encoder.markers[id(box)] = box  # as while another thread encodes it
    assert json.loads(line(None, "info", {"event": "x", "box": box}))["box"] == {"k": "v"}


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_an_opaque_bearer_token_is_redacted_whatever_the_case_of_the_scheme(scheme: str) -> None:
    opaque = "a1B2c3D4e5F6g7H8i9J0"
    got = json.loads(_JsonLine()(None, "info", {"event": "x", "detail": f"{scheme} {opaque}"}))
    assert opaque not in got["detail"] and got["detail"].startswith(f"{scheme} <token ")
