"""
Checks a submission body the way the vendor does, one field at a time.

Every refusal names the field in its message, because a client is expected to show ``msg`` to
the person who wrote the DAG, and "422" alone tells them nothing.
"""

from __future__ import annotations

from typing import Any

from imagecb_provider.testing.simulator.config import ASPECT_RATIOS, MODELS, OUTPUT_FORMATS
from imagecb_provider.testing.simulator.markers import MarkerError, Plan, parse_markers

BOOL_FIELDS = ("enableTranslation", "uploadCn", "promptUpsampling")
URL_FIELDS = ("inputImage", "callBackUrl")
CHOICES: dict[str, tuple[str, ...]] = {
    "aspectRatio": tuple(ASPECT_RATIOS),
    "outputFormat": OUTPUT_FORMATS,
    "model": MODELS,
}


class ValidationFailure(ValueError):
    """
    A submission the vendor would refuse; the message names the field.

    :param message: what is wrong, naming the field.
    :param code: the code the vendor answers it with: 422, but 500 for ``safetyTolerance`` out of
        range (the quickstart's "Safety Tolerance Out of Range (Code 500)").
    """

    def __init__(self, message: str, code: int = 422) -> None:
        super().__init__(message)
        self.code = code


#: The answer to a safetyTolerance out of range. The vendor documents the code (500) and the
#: ranges; the exact wording of its msg is not documented, so this text is a guess.
SAFETY_TOLERANCE_RANGE = "safetyTolerance must be 0-6 when generating, 0-2 when editing"


def validate_submission(body: Any) -> Plan:
    """Refuse a bad body with :class:`ValidationFailure`; return the prompt's marker plan."""
    if not isinstance(body, dict):
        raise ValidationFailure("request body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValidationFailure("prompt is required and must be a non-empty string")
    for name in BOOL_FIELDS:
        _check_type(body, name, bool, "true or false")
    for name in URL_FIELDS:
        _check_url(body, name)
    _check_type(body, "watermark", str, "a string")
    for name, allowed in CHOICES.items():
        _check_choice(body, name, allowed)
    _check_safety_tolerance(body)
    try:
        return parse_markers(prompt)
    except MarkerError as error:
        raise ValidationFailure(f"prompt: {error}") from None


def _check_type(body: dict, name: str, kind: type, described: str) -> None:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise ValidationFailure(f"{name} must be {described}, got {type(value).__name__}")


def _check_url(body: dict, name: str) -> None:
    value = body.get(name)
    if value is None:
        return
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ValidationFailure(f"{name} must be an http(s) URL")


def _check_choice(body: dict, name: str, allowed: tuple[str, ...]) -> None:
    value = body.get(name)
    if value is not None and value not in allowed:
        raise ValidationFailure(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _check_safety_tolerance(body: dict) -> None:
    value = body.get("safetyTolerance")
    if value is None:
        return
    high = 2 if body.get("inputImage") else 6
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationFailure(f"safetyTolerance must be an integer, got {type(value).__name__}")
    if not 0 <= value <= high:
        mode = "editing (inputImage set)" if high == 2 else "generating"
        raise ValidationFailure(f"{SAFETY_TOLERANCE_RANGE}; got {value} when {mode}", code=500)
