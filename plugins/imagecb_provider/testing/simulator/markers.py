"""
Prompt markers: how a test chooses a task's fate by writing it into the prompt.

Markers travel inside the one field every client already sends, so a DAG or an operator can be
driven into any outcome without special client code. Parsing is strict: a misspelt marker is a
422, not a silently successful task that makes a test pass for the wrong reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class MarkerError(ValueError):
    """A ``[sim:...]`` marker that the simulator does not know, or with a bad value."""


@dataclass(frozen=True)
class Outcome:
    """What a finished task reports: record fields and the code its callback carries."""

    name: str
    success_flag: int
    error_code: int | None
    error_message: str
    callback_code: int
    callback_msg: str


SUCCESS = Outcome("success", 1, None, "", 200, "BFL image generated successfully.")
OUTCOMES: dict[str, Outcome] = {
    o.name: o
    for o in (
        SUCCESS,
        Outcome(
            "content_policy",
            3,
            400,
            "Your prompt was flagged by Website as violating content policies.",
            400,
            "Your prompt was flagged by Website as violating content policies.",
        ),
        Outcome(
            "internal_error",
            3,
            500,
            "Internal Error, Please try again later.",
            500,
            "Internal Error, Please try again later.",
        ),
        Outcome(
            "generation_failed",
            3,
            501,
            "Image generation task failed.",
            501,
            "Image generation task failed.",
        ),
        Outcome(
            "create_failed", 2, None, "Create task failed.", 500, "Internal Error, Please try again later."
        ),
        Outcome(
            "upstream_timeout",
            3,
            408,
            "Upstream gave no result for over 10 minutes.",
            500,
            "Internal Error, Please try again later.",
        ),
    )
}
#: Outcomes ``random_failure_rate`` draws from, by errorCode.
RANDOM_FAILURES = {400: "content_policy", 500: "internal_error", 501: "generation_failed"}

FLAG_MARKERS = ("flaky", "never", "hold", "duplicate_callback")
_MARKER = re.compile(r"\[sim:([a-z_]+)(?:=([^\]]*))?\]", re.IGNORECASE)


@dataclass(frozen=True)
class Plan:
    """
    What the markers of one prompt ask for; ``None`` fields mean "no marker, use config".

    ``hold`` keeps the task generating until ``POST /_sim/release``; it then completes after
    ``latency`` (the marker's, or none at all: config ``latency`` does not apply after a release).
    """

    outcome: str | None = None
    flaky: bool = False
    never: bool = False
    hold: bool = False
    latency: float | None = None
    duplicate_callback: bool = False


def parse_markers(prompt: str) -> Plan:
    """Read every marker of ``prompt``; the first outcome marker wins over later ones."""
    found: dict[str, object] = {}
    for match in _MARKER.finditer(prompt):
        name, value = match.group(1).lower(), match.group(2)
        if name == "latency":
            found.setdefault("latency", _latency(value))
        elif name in OUTCOMES and name != "success" and value is None:
            found.setdefault("outcome", name)
        elif name in FLAG_MARKERS and value is None:
            found[name] = True
        else:
            raise MarkerError(f"prompt has an unknown simulator marker {match.group(0)!r}")
    if found.get("hold") and found.get("never"):
        raise MarkerError("prompt markers [sim:hold] and [sim:never] contradict each other; use one")
    return Plan(**found)  # type: ignore[arg-type]


def _latency(value: str | None) -> float:
    try:
        seconds = float(value or "")
    except ValueError:
        raise MarkerError(f"prompt marker [sim:latency=...] needs seconds, got {value!r}") from None
    if not 0 <= seconds < float("inf"):
        raise MarkerError(f"prompt marker [sim:latency=...] must be >= 0, got {value!r}")
    return seconds
