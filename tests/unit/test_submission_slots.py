"""The connection extra ``submission_slots``: each submitting task's share of the account's limit."""

from __future__ import annotations

import json

import pytest
from airflow.models.connection import Connection

from imagecb_provider.exceptions import ImageCbConfigurationError
from imagecb_provider.hooks.imagecb import ImageCbConnectionSettings


def _settings(**extra) -> ImageCbConnectionSettings:
    conn = Connection(conn_id="acct", conn_type="imagecb", password="k", extra=json.dumps(extra))
    return ImageCbConnectionSettings.from_connection(conn)


@pytest.mark.parametrize(
    ("extra", "slots", "share"),
    [
        ({}, 1, 20.0),
        ({"submissions_per_10s": 2000, "submission_slots": 4}, 4, 500.0),
        ({"submissions_per_10s": 2000, "submission_slots": "8"}, 8, 250.0),
        ({"submissions_per_10s": 20, "submission_slots": 2}, 2, 10.0),
    ],
)
def test_each_task_paces_at_its_slots_share_of_the_limit(extra, slots, share):
    settings = _settings(**extra)
    assert (settings.submission_slots, settings.share_per_10s) == (slots, share)


@pytest.mark.parametrize("value", [0, -2, 2.5, "two", True, [4]])
def test_a_slot_count_that_is_not_a_positive_integer_is_refused_naming_the_fix(value):
    with pytest.raises(ImageCbConfigurationError) as caught:
        _settings(submissions_per_10s=2000, submission_slots=value)
    message = str(caught.value)
    assert "submission_slots=" in message
    assert "an integer from 1 to 200 at submissions_per_10s=2000" in message


def test_more_slots_than_the_limit_can_share_are_refused():
    """Three slots at 20 per 10 s would give each under one submission a second."""
    with pytest.raises(ImageCbConfigurationError, match=r"at least 10 submissions per 10 s.*from 1 to 2 "):
        _settings(submissions_per_10s=20, submission_slots=3)
