"""How a slot is settled when its submission is uncertain, and when the API forgot its remote task."""

from __future__ import annotations

import pytest

from imagecb_provider.exceptions import ImageCbNotFound, ImageCbServerError
from imagecb_provider.models import Outcome
from imagecb_provider.testing.airflow import InMemoryTaskStateStore
from imagecb_provider.triggers.task import error_details
from imagecb_provider.utils.generation import _fail_on_error, _settle_uncertain
from imagecb_provider.utils.ledger import LedgerEntry, Slot, SubmissionLedger
from imagecb_provider.utils.waiting import error_from_event

ADVICE = (
    ": the API may have accepted and charged it, so it is not resent automatically. "
    "Check the account for a task of that time, then clear the task to submit again"
)


def test_an_uncertain_submission_says_when_it_was_sent_and_what_to_do():
    slot = Slot(key="k", sending=True, sending_since="2026-12-02T10:00:00Z")
    _settle_uncertain(slot, "Sent, but no answer came back (ReadTimeout).")
    assert slot.outcome == Outcome.SUBMISSION_UNCERTAIN.value
    assert slot.message == (
        "Sent, but no answer came back (ReadTimeout) (sent at 2026-12-02T10:00:00Z)" + ADVICE
    )


def test_an_uncertain_submission_without_a_sending_time_names_none():
    slot = Slot(key="k", sending=True)
    _settle_uncertain(slot, ".Its answer was lost...")
    assert slot.message == ".Its answer was lost" + ADVICE


@pytest.mark.parametrize(
    "error",
    [ImageCbServerError(502, "bad gateway", "/api/v1/x"), ImageCbNotFound(404, "no such task", "/api/v1/y")],
)
def test_an_api_error_crosses_the_trigger_event_intact(error):
    rebuilt = error_from_event(error_details(error, "r1"))
    assert type(rebuilt) is type(error)
    assert (rebuilt.code, rebuilt.msg, rebuilt.endpoint, str(rebuilt)) == (
        error.code,
        error.msg,
        error.endpoint,
        str(error),
    )


def test_a_remote_task_unknown_to_the_api_is_retired_so_the_next_try_submits_anew():
    store = InMemoryTaskStateStore()
    ledger = SubmissionLedger({"task_state_store": store})
    entry = LedgerEntry(
        slots=[Slot(key="a", remote_task_id="gone", polls=2), Slot(key="b", remote_task_id="kept", polls=1)]
    )
    details = error_details(ImageCbNotFound(404, "recordInfo is null", "/record-info"), "gone")
    with pytest.raises(ImageCbNotFound, match="recordInfo is null"):
        _fail_on_error(entry, ledger, details)
    stored = ledger.load()
    assert stored is not None
    assert not stored.finished
    gone, kept = stored.slots
    assert (gone.remote_task_id, gone.outcome, gone.polls) == (None, None, 0)
    assert gone.earlier == [
        {"remote_task_id": "gone", "outcome": None, "message": "unknown to the API (404)"}
    ]
    assert (kept.remote_task_id, kept.polls, kept.earlier) == ("kept", 1, [])


def test_any_other_api_error_leaves_every_slot_to_reconnect_to():
    ledger = SubmissionLedger({"task_state_store": InMemoryTaskStateStore()})
    entry = LedgerEntry(slots=[Slot(key="a", remote_task_id="r1")])
    with pytest.raises(ImageCbServerError):
        _fail_on_error(entry, ledger, error_details(ImageCbServerError(500, "down", "/x"), "r1"))
    assert ledger.load().slots[0].remote_task_id == "r1"


def test_only_a_retry_is_not_a_new_run():
    from types import SimpleNamespace

    from imagecb_provider.utils.generation import is_new_run

    def context(try_number: int, max_tries: int) -> dict:
        ti = SimpleNamespace(try_number=try_number, max_tries=max_tries)
        return {"ti": ti, "task": SimpleNamespace(retries=2)}

    assert is_new_run({})  # called outside a task instance: nothing to resume
    assert is_new_run(context(1, 2))  # the first try
    assert not is_new_run(context(2, 2))  # its retry
    assert is_new_run(context(4, 5))  # the first try after a clear from the UI (max_tries moved on)
