"""
Hostile remote task ids where they enter: a record-info answer, a trigger, a sensor's template, the ledger.

Each id below is refused by the one strict form (``models.remote_task_id``); the archive's own
attacks are in tests/integration/test_archive_containment.py, the submit answers over real HTTP in
tests/integration/test_generate_hostile_answers.py.
"""

from __future__ import annotations

import pytest

from imagecb_provider.exceptions import ImageCbConfigurationError, InvalidRemoteTaskId
from imagecb_provider.hooks.imagecb import ImageCbHook
from imagecb_provider.models import TaskRecord, remote_task_id
from imagecb_provider.sensors.task import ImageTaskSensor
from imagecb_provider.triggers.task import ImageTaskTrigger
from imagecb_provider.utils.ledger import Action, LedgerEntry, Slot, plan_slots

#: Path tricks, encodings, lookalikes, lengths and types; none is a remote task id.
HOSTILE_IDS = [
    "../../escaped",
    "/abs",
    "/etc/cron.d/x",
    "../../../../tmp/x/pwned",
    "a/../../b",
    "..",
    ".",
    "a\\..\\b",
    "%2e%2e",
    "%2e%2e%2fx",
    "\u2024\u2024",  # ONE DOT LEADER twice: looks like ".."
    "\uff0e\uff0e",  # FULLWIDTH FULL STOP twice
    "\u2215etc\u2215x",  # DIVISION SLASH: looks like "/etc/x"
    "t\u0430sk1",  # Cyrillic a
    "task\x00",
    "task\n",
    " task",
    "x" * 129,
    "",
    None,
    12345,
]

RECORD = {
    "taskId": "task12345",
    "paramJson": '{"prompt":"a cat"}',
    "completeTime": "2024-03-20T10:30:00Z",
    "response": {"originImageUrl": "https://x/o.jpg", "resultImageUrl": "https://x/r.jpg"},
    "successFlag": 1,
    "errorCode": None,
    "errorMessage": "",
    "createTime": "2024-03-20T10:25:00Z",
}


@pytest.mark.parametrize("value", HOSTILE_IDS, ids=repr)
def test_the_one_form_refuses_every_hostile_id(value):
    with pytest.raises(InvalidRemoteTaskId, match=r"from the probe: a remote task id is 1 to 128"):
        remote_task_id(value, "the probe")


@pytest.mark.parametrize("value", ["task12345", "task_flux-2_1765175490366", "x" * 128, "a"])
def test_the_vendors_documented_ids_pass(value):
    assert remote_task_id(value, "the probe") == value


# ------------------------------------------------------------------------- record-info
@pytest.mark.parametrize("value", HOSTILE_IDS, ids=repr)
def test_a_record_info_answer_with_a_hostile_task_id_is_refused(value):
    with pytest.raises(InvalidRemoteTaskId, match="from a record-info answer") as refused:
        TaskRecord.from_record_info({**RECORD, "taskId": value})
    assert refused.value.where == "a record-info answer"


def test_a_record_info_answer_with_a_hostile_snake_case_task_id_is_refused():
    data = {k: v for k, v in RECORD.items() if k != "taskId"}
    with pytest.raises(InvalidRemoteTaskId):
        TaskRecord.from_record_info({**data, "task_id": "../../escaped"})
    with pytest.raises(InvalidRemoteTaskId):
        TaskRecord.from_record_info(data)  # no id at all: not the vendor's answer


def test_the_refusal_shows_a_long_value_shortened():
    with pytest.raises(InvalidRemoteTaskId) as refused:
        TaskRecord.from_record_info({**RECORD, "taskId": "/" * 500})
    assert len(str(refused.value)) < 200


# ----------------------------------------------------------------------------- trigger
@pytest.mark.parametrize("value", HOSTILE_IDS, ids=repr)
def test_a_trigger_is_never_built_for_a_hostile_id(value):
    with pytest.raises(InvalidRemoteTaskId, match="the remote task ids of ImageTaskTrigger"):
        ImageTaskTrigger(remote_task_ids=["good-1", value], deadline=0)


def test_a_trigger_rebuilt_from_tampered_kwargs_is_refused():
    _, kwargs = ImageTaskTrigger(remote_task_id="good-1", deadline=0).serialize()
    kwargs["remote_task_ids"] = ["../../escaped"]
    with pytest.raises(InvalidRemoteTaskId, match="ImageTaskTrigger"):
        ImageTaskTrigger(**kwargs)


# ------------------------------------------------------------------------------ sensor
@pytest.fixture
def no_status_call(monkeypatch):
    """Record status calls instead of making them: a hostile id must never reach one."""
    calls: list[str] = []

    def get_task(hook, task_id):
        calls.append(task_id)
        raise AssertionError(f"status call for {task_id!r}")

    monkeypatch.setattr(ImageCbHook, "get_task", get_task)
    return calls


@pytest.mark.parametrize("deferrable", [True, False])
@pytest.mark.parametrize("value", ["../../escaped", "/etc/cron.d/x", "a\\..\\b", "\uff0e\uff0e", "x" * 129])
def test_a_sensor_with_a_hostile_templated_id_fails_before_any_status_call(value, deferrable, no_status_call):
    sensor = ImageTaskSensor(task_id="wait", remote_task_id="{{ params.rid }}", deferrable=deferrable)
    sensor.render_template_fields({"params": {"rid": value}})
    assert sensor.remote_task_id == value
    with pytest.raises(ImageCbConfigurationError) as refused:
        sensor.execute({})
    message = str(refused.value)
    assert message.startswith("Invalid remote_task_id: Refused the remote task id ")
    assert "a remote task id is 1 to 128 letters, digits, '_' or '-'" in message
    assert isinstance(refused.value.__cause__, InvalidRemoteTaskId)
    assert no_status_call == []


def test_a_sensor_rendered_to_nothing_fails_the_same_way(no_status_call):
    sensor = ImageTaskSensor(task_id="wait", remote_task_id="{{ params.rid }}", deferrable=False)
    sensor.render_template_fields({"params": {"rid": ""}})
    with pytest.raises(ImageCbConfigurationError, match="remote_task_id"):
        sensor.execute({})
    with pytest.raises(ImageCbConfigurationError, match="remote_task_id"):
        sensor.poke({})
    assert no_status_call == []


# ------------------------------------------------------------------------------ ledger
@pytest.mark.parametrize("finished", [False, True])
@pytest.mark.parametrize("new_run", [False, True])
@pytest.mark.parametrize("value", ["../../escaped", "/abs", "", "x" * 129])
def test_a_stored_id_not_of_the_form_is_uncertain_never_polled_nor_resent(value, finished, new_run):
    entry = LedgerEntry(slots=[Slot(key="k", remote_task_id=value, outcome="success")], finished=finished)
    _, actions = plan_slots(entry, ["k"], reuse_successes=True, new_run=new_run)
    assert actions == [Action.UNCERTAIN]


def test_a_delivered_uncertain_submission_stays_uncertain_on_an_automatic_retry():
    """A batch that raised a retryable outcome is retried with its uncertain slot in it: not resent."""
    entry = LedgerEntry(
        slots=[Slot(key="k", sending=True, outcome="submission_uncertain", message="why")], finished=True
    )
    assert plan_slots(entry, ["k"], reuse_successes=True, new_run=False)[1] == [Action.UNCERTAIN]
    # A person checked the account and cleared the task: sent again.
    assert plan_slots(entry, ["k"], reuse_successes=True, new_run=True)[1] == [Action.SUBMIT]
