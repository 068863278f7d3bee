"""
The simulator's configuration: one dataclass, changeable while the server runs.

Every field can be set at start (``SimulatorConfig(...)``, CLI flags, ``IMAGECB_SIM_CONFIG``) and
later through ``POST /_sim/config``; :meth:`SimulatorConfig.update` is the one place that checks
and coerces values, so a bad value is refused the same way whichever door it came through.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "21:9": (21, 9),
    "16:9": (16, 9),
    "4:3": (4, 3),
    "1:1": (1, 1),
    "3:4": (3, 4),
    "9:16": (9, 16),
}
OUTPUT_FORMATS = ("jpeg", "png")
MODELS = ("flux-kontext-pro", "flux-kontext-max")
#: Fault kinds ``fault_kinds`` may name; the default keeps to the first three (record-info's habits).
FAULT_KINDS = ("500", "455", "429", "501", "408", "drop")
DEFAULT_FAULT_KINDS = ("500", "455", "drop")
#: The File Upload API's three endpoints (``uploads.py``), as ``fault_endpoints`` and injections name them.
UPLOAD_ENDPOINTS = ("file-stream-upload", "file-base64-upload", "file-url-upload")
#: Endpoints ``fault_endpoints`` may name: the four API calls, the file downloads and the uploads.
FAULT_ENDPOINTS = ("generate", "record-info", "credit", "download-url", "files", *UPLOAD_ENDPOINTS)
#: createTime/completeTime forms: ISO with Z (the reference's examples), a space and no zone (a real
#: answer of another model of the API family), epoch milliseconds (public clients' typing).
TIMESTAMP_FORMATS = ("iso", "space", "epoch_ms")
#: How record-info answers for a task it does not know: HTTP 200 with code 422 "The record does
#: not exist" (what third-party clients report: the default), code 404, or code 200 with data null.
UNKNOWN_RECORD_FORMS = ("422", "404", "null")
SECRET_FIELDS = ("api_key", "webhook_hmac_key")
REDACTED = "***"


def _default_costs() -> dict[str, float]:
    return {"flux-kontext-pro": 5.0, "flux-kontext-max": 10.0}


@dataclass
class SimulatorConfig:
    """
    How the simulated API behaves. Defaults mirror what is known of the real service.

    ``time_factor`` scales every delay the simulator waits out by itself (task latency and
    callback retry delays) so a test can compress minutes into milliseconds; ``origin_ttl`` is
    deliberately not scaled, so link-expiry tests stay independent of task speed.
    ``hold_callbacks`` keeps each callback that comes due from being sent until
    ``POST /_sim/callbacks/release`` (or until it is turned off, which sends the held ones).
    ``unknown_record`` is how record-info answers for a task it does not know (see
    :data:`UNKNOWN_RECORD_FORMS`); ``null_strings`` writes the string ``"null"`` in the empty
    fields of records and callbacks (``errorCode``, ``errorMessage``, ``completeTime``, the links),
    as real answers of the API family do. ``submission_cap`` models a key's hourly, daily or total
    cap: once that many submissions were accepted (counted from when the option was set), every
    further one is refused with 429 and :data:`CAP_MESSAGE`, with ``Retry-After`` only when
    ``submission_cap_retry_after`` is set; setting the option again (``null`` lifts it) restarts
    the count.
    """

    api_key: str = field(default="test-key", repr=False)
    latency: float = 5.0
    time_factor: float = 1.0
    rate_limit_count: int = 20
    rate_limit_window: float = 10.0
    submission_cap: int | None = None
    submission_cap_retry_after: float | None = None
    credits: float = 1000.0
    cost_per_image: dict[str, float] = field(default_factory=_default_costs)
    disabled_models: tuple[str, ...] = ()
    http_status_errors: bool = False
    timestamp_format: str = "iso"
    unknown_record: str = "422"
    null_strings: bool = False
    origin_ttl: float = 600.0
    download_url_ttl: float = 1200.0
    upload_ttl: float = 86400.0
    upload_max_bytes: int = 10 * 1024 * 1024
    random_failure_rate: float = 0.0
    seed: int = 0
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = DEFAULT_FAULT_KINDS
    fault_endpoints: tuple[str, ...] = ("record-info",)
    submit_answer_delay: float = 0.0
    webhook_hmac_key: str | None = field(default=None, repr=False)
    duplicate_callbacks: bool = False
    callback_retry_delays: tuple[float, ...] = (60.0, 300.0, 900.0)
    callback_timeout: float = 15.0
    hold_callbacks: bool = False

    def __post_init__(self) -> None:
        """Run the same checks as :meth:`update`, so a bad value fails where it was written."""
        self.update(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def update(self, **changes: Any) -> SimulatorConfig:
        """Check and apply ``changes`` all or nothing; raise ``ValueError`` naming the field."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ValueError(f"unknown simulator option(s): {', '.join(unknown)}")
        coerced = {name: _coerce(name, value) for name, value in changes.items()}
        _check_combination({name: coerced.get(name, getattr(self, name, None)) for name in _COMBINED})
        for name, value in coerced.items():
            object.__setattr__(self, name, value)
        return self

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """JSON-ready copy; secrets become ``***`` unless ``redact`` is false (child processes)."""
        data = dataclasses.asdict(self)
        for name in ("disabled_models", "fault_kinds", "fault_endpoints", "callback_retry_delays"):
            data[name] = list(data[name])
        if redact:
            for name in SECRET_FIELDS:
                if data[name] is not None:
                    data[name] = REDACTED
        return data

    def copy(self, **changes: Any) -> SimulatorConfig:
        clone = dataclasses.replace(self)
        clone.cost_per_image = dict(self.cost_per_image)
        return clone.update(**changes)


def _number(name: str, value: Any, *, low: float | None = 0.0, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be between {low} and {high}, got {value!r}")
    return float(value)


def _integer(name: str, value: Any, *, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _strings(name: str, value: Any, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple | set | frozenset):
        raise ValueError(f"{name} must be a list of strings, got {value!r}")
    items = tuple(str(v) for v in value)
    bad = [v for v in items if allowed is not None and v not in allowed]
    if bad:
        raise ValueError(f"{name} allows only {', '.join(allowed or ())}, got {', '.join(bad)}")
    return items


def _costs(name: str, value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping of model to cost")
    return {str(model): _number(f"{name}[{model}]", cost) for model, cost in value.items()}


def _optional_text(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string or null")
    return value or None


def _text(name: str, value: Any, allowed: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str) or (allowed is not None and value not in allowed):
        choices = f" (one of {', '.join(allowed)})" if allowed else ""
        raise ValueError(f"{name} must be a string{choices}, got {value!r}")
    return value


_COERCERS: dict[str, Any] = {
    "api_key": _text,
    "latency": _number,
    "time_factor": _number,
    "rate_limit_count": _integer,
    "rate_limit_window": lambda n, v: _number(n, v, low=0.0),
    "submission_cap": lambda n, v: None if v is None else _integer(n, v),
    "submission_cap_retry_after": lambda n, v: None if v is None else _number(n, v),
    "credits": lambda n, v: _number(n, v, low=None),
    "cost_per_image": _costs,
    "disabled_models": _strings,
    "http_status_errors": _boolean,
    "timestamp_format": lambda n, v: _text(n, v, TIMESTAMP_FORMATS),
    "unknown_record": lambda n, v: _text(n, v, UNKNOWN_RECORD_FORMS),
    "null_strings": _boolean,
    "origin_ttl": _number,
    "download_url_ttl": _number,
    "upload_ttl": _number,
    "upload_max_bytes": _integer,
    "random_failure_rate": lambda n, v: _number(n, v, high=1.0),
    "seed": lambda n, v: _integer(n, v, low=-(2**63)),
    "fault_rate": lambda n, v: _number(n, v, high=1.0),
    "fault_kinds": lambda n, v: _strings(n, v, FAULT_KINDS),
    "fault_endpoints": lambda n, v: _strings(n, v, FAULT_ENDPOINTS),
    "submit_answer_delay": _number,
    "webhook_hmac_key": _optional_text,
    "duplicate_callbacks": _boolean,
    "callback_retry_delays": lambda n, v: tuple(_number(n, d) for d in _strings_or_numbers(n, v)),
    "callback_timeout": _number,
    "hold_callbacks": _boolean,
}


def _strings_or_numbers(name: str, value: Any) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"{name} must be a list of numbers, got {value!r}")
    return tuple(value)


def _coerce(name: str, value: Any) -> Any:
    return _COERCERS[name](name, value)


_COMBINED = ("fault_kinds", "fault_endpoints")


def _check_combination(values: dict[str, Any]) -> None:
    """
    Refuse a random ``drop`` on ``generate``: the client could not tell it from a lost answer.

    The server learns that a request is a submission only after the client has sent it, so a
    connection cut then looks to the client exactly like an answer lost after the charge; the
    provider rightly treats that as "maybe charged" and never resends, which a test expecting
    "never charged" would misread. Injected drops (``/_sim/inject``) stay available: the test
    that queues one knows what it did.
    """
    if "drop" in (values["fault_kinds"] or ()) and "generate" in (values["fault_endpoints"] or ()):
        raise ValueError(
            "fault_kinds 'drop' cannot apply to the generate endpoint (a cut submission is "
            "indistinguishable from a charged one whose answer was lost): leave 'drop' out of "
            "fault_kinds (e.g. 500, 455, 429) or 'generate' out of fault_endpoints"
        )
