"""The submission ledger's rule, one case per row: what a try does with each stored request."""

from __future__ import annotations

import pytest

from imagecb_provider.testing.airflow import InMemoryTaskStateStore as DictStore
from imagecb_provider.utils.ledger import (
    STATE_KEY,
    Action,
    LedgerEntry,
    Slot,
    SubmissionLedger,
    plan_slots,
    remote_ids_of_slot,
)

SUBMIT, RECONNECT, UNCERTAIN = Action.SUBMIT, Action.RECONNECT, Action.UNCERTAIN


def _entry(*, finished: bool, **slot) -> LedgerEntry:
    return LedgerEntry(slots=[Slot(key="k", **slot)], finished=finished)


def _plan(entry: LedgerEntry | None, *, reuse: bool = False, new_run: bool = False) -> Action:
    return plan_slots(entry, ["k"], reuse_successes=reuse, new_run=new_run)[1][0]


@pytest.mark.parametrize("outcome", [None, "success", "content_policy", "internal_error", "timeout"])
@pytest.mark.parametrize("new_run", [False, True])
def test_an_undelivered_outcome_is_always_reconnected_to(outcome, new_run):
    """The stale defer-exit race: the event came, execute_complete never ran; nothing is paid twice."""
    entry = _entry(finished=False, remote_task_id="r1", outcome=outcome)
    assert _plan(entry, new_run=new_run) == RECONNECT


def test_an_answer_lost_in_an_earlier_try_is_uncertain_and_never_resent():
    assert _plan(_entry(finished=False, sending=True)) == UNCERTAIN


def test_nothing_stored_or_never_sent_is_submitted():
    assert _plan(None) == SUBMIT
    assert _plan(_entry(finished=False)) == SUBMIT


@pytest.mark.parametrize(
    ("outcome", "reuse", "new_run", "action"),
    [
        ("internal_error", False, False, SUBMIT),  # a retry after a raised internal error
        ("generation_failed", False, False, SUBMIT),
        ("internal_error", True, True, SUBMIT),  # a batch group cleared from the UI
        ("success", False, True, SUBMIT),  # one image cleared from the UI: a new image
        ("success", True, True, RECONNECT),  # a batch rerun keeps what succeeded
        ("timeout", False, False, RECONNECT),  # the image may still come
        ("timeout", True, True, RECONNECT),
        ("content_policy", False, False, RECONNECT),  # an automatic retry would be flagged and paid again
        ("content_policy", False, True, SUBMIT),  # a person cleared it: send it again
        ("submission_uncertain", False, True, SUBMIT),  # a person checked the account and cleared it
    ],
)
def test_a_delivered_outcome(outcome, reuse, new_run, action):
    remote_task_id = None if outcome == "submission_uncertain" else "r1"
    entry = _entry(finished=True, remote_task_id=remote_task_id, outcome=outcome)
    assert _plan(entry, reuse=reuse, new_run=new_run) == action


def test_a_changed_request_starts_its_slot_afresh_and_others_keep_theirs():
    entry = LedgerEntry(
        slots=[Slot(key="a", remote_task_id="r-a"), Slot(key="b", remote_task_id="r-b")], finished=False
    )
    slots, actions = plan_slots(entry, ["a", "changed", "c"], reuse_successes=True, new_run=False)
    assert actions == [RECONNECT, SUBMIT, SUBMIT]
    assert [s.remote_task_id for s in slots] == ["r-a", None, None]
    assert [s.key for s in slots] == ["a", "changed", "c"]


def test_retire_moves_the_remote_task_to_earlier_and_clears_the_slot():
    slot = Slot(key="k", remote_task_id="r1", outcome="internal_error", message="boom", polls=3, via="poll")
    slot.record = {"task_id": "r1"}
    slot.retire()
    assert slot.earlier == [{"remote_task_id": "r1", "outcome": "internal_error", "message": "boom"}]
    assert (slot.remote_task_id, slot.outcome, slot.message, slot.polls, slot.record, slot.via) == (
        None,
        None,
        "",
        0,
        None,
        None,
    )
    slot.retire()  # nothing current: nothing more to remember
    assert len(slot.earlier) == 1


def test_the_ledger_round_trips_through_the_store_and_ignores_other_versions():
    store = DictStore()
    ledger = SubmissionLedger({"task_state_store": store})
    entry = LedgerEntry(slots=[Slot(key="k", remote_task_id="r1", earlier=[{"remote_task_id": "r0"}])])
    ledger.save(entry)
    assert ledger.load() == entry
    # The try that delivered the outcome decides whether an automatic retry may pay again.
    delivered = LedgerEntry(slots=entry.slots, finished=True, delivered_try=2)
    ledger.save(delivered)
    assert ledger.load() == delivered
    store[STATE_KEY] = {"remote_task_id": "r1", "finished": False}  # version 1 shape
    assert ledger.load() is None
    assert not SubmissionLedger({}).available
    assert SubmissionLedger({}).load() is None


def test_remote_ids_of_slot_names_every_attempt_or_none_when_unbound():
    value = LedgerEntry(
        slots=[
            Slot(key="a", remote_task_id="r2", earlier=[{"remote_task_id": "r1"}]),
            Slot(key="b", sending=True),
        ]
    ).to_dict()
    assert remote_ids_of_slot(value, 0) == {"r1", "r2"}
    assert remote_ids_of_slot(value, 1) is None
    value["slots"][0]["sending"] = True  # a resubmission in flight: its new id is not known yet
    assert remote_ids_of_slot(value, 0) is None
    assert remote_ids_of_slot(value, 2) is None
    assert remote_ids_of_slot(None, 0) is None
    assert remote_ids_of_slot({"slots": "junk"}, 0) is None


def test_remote_ids_of_slot_ignore_empty_and_non_string_ids():
    value = {"slots": [{"remote_task_id": "", "earlier": [{"remote_task_id": 7}, {"remote_task_id": None}]}]}
    assert remote_ids_of_slot(value, 0) is None
    value["slots"][0]["earlier"].append({"remote_task_id": "r1"})
    assert remote_ids_of_slot(value, 0) == {"r1"}
