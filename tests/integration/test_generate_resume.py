"""
The operator's resume decisions over real HTTP. ``task_state_store`` is stood in for by a dict
with the same methods, because a rerun cleared from the UI cannot be produced under
``dag.test()`` (it replaces the whole run); the crash and timeout retries are also proven in
real Airflow in tests/dags/test_generate_dags.py.
"""

from __future__ import annotations

import pytest

from imagecb_provider.hooks.imagecb import ImageCbHook
from imagecb_provider.models import GenerationRequest
from imagecb_provider.operators.generate import STATE_KEY, ImageGenerateOperator


class DictStateStore(dict):
    """The four methods of Airflow's task_state_store accessor, kept in memory."""

    def get(self, key, default=None):
        return super().get(key, default)

    def set(self, key, value, retention=None):
        self[key] = value

    def delete(self, key):
        self.pop(key, None)


def _operator(prompt: str, **kwargs) -> ImageGenerateOperator:
    return ImageGenerateOperator(
        task_id="generate", prompt=prompt, deferrable=False, poll_interval=0.1, **kwargs
    )


def _stored(remote_task_id: str, prompt: str, *, finished: bool = False) -> dict:
    return {
        "remote_task_id": remote_task_id,
        "request": {"prompt": prompt},
        "submitted_at": "2026-01-01T00:00:00+00:00",
        "polls": 0,
        "finished": finished,
    }


def test_first_try_stores_the_submission_and_marks_it_finished(imagecb_simulator):
    store = DictStateStore()
    result = _operator("a pier").execute({"task_state_store": store})
    assert store[STATE_KEY]["remote_task_id"] == result["task_id"]
    assert store[STATE_KEY]["finished"] is True
    assert imagecb_simulator.stats()["submissions"] == {"a pier": 1}


def test_retry_reconnects_to_a_task_still_generating(imagecb_simulator):
    imagecb_simulator.configure(latency=0.6)
    remote_task_id = ImageCbHook().submit(GenerationRequest(prompt="a mill"))
    store = DictStateStore({STATE_KEY: _stored(remote_task_id, "a mill")})
    result = _operator("a mill").execute({"task_state_store": store})
    assert result["task_id"] == remote_task_id
    assert result["outcome"] == "success"
    assert result["submitted_at"] == "2026-01-01T00:00:00Z"
    assert imagecb_simulator.stats()["submissions"] == {"a mill": 1}


def test_retry_takes_the_result_of_a_task_that_already_succeeded(imagecb_simulator):
    imagecb_simulator.configure(latency=0.0)
    remote_task_id = ImageCbHook().submit(GenerationRequest(prompt="a barn"))
    store = DictStateStore({STATE_KEY: _stored(remote_task_id, "a barn")})
    result = _operator("a barn").execute({"task_state_store": store})
    assert (result["task_id"], result["outcome"], result["polls"]) == (remote_task_id, "success", 1)
    assert imagecb_simulator.stats()["status_calls"][remote_task_id] == 1
    assert imagecb_simulator.stats()["submissions"] == {"a barn": 1}


def test_retry_submits_anew_when_the_stored_task_failed(imagecb_simulator):
    imagecb_simulator.configure(latency=0.0)
    prompt = "a silo [sim:flaky]"
    failed_id = ImageCbHook().submit(GenerationRequest(prompt=prompt))
    store = DictStateStore({STATE_KEY: _stored(failed_id, prompt)})
    result = _operator(prompt).execute({"task_state_store": store})
    assert result["task_id"] != failed_id
    assert result["outcome"] == "success"
    assert imagecb_simulator.stats()["submissions"] == {prompt: 2}


def test_a_cleared_rerun_of_a_finished_try_makes_a_new_image(imagecb_simulator):
    imagecb_simulator.configure(latency=0.0)
    old_id = ImageCbHook().submit(GenerationRequest(prompt="a dam"))
    store = DictStateStore({STATE_KEY: _stored(old_id, "a dam", finished=True)})
    result = _operator("a dam").execute({"task_state_store": store})
    assert result["task_id"] != old_id
    assert imagecb_simulator.stats()["submissions"] == {"a dam": 2}
    assert old_id not in imagecb_simulator.stats()["status_calls"]


def test_submit_only_retry_returns_the_stored_id(imagecb_simulator):
    store = DictStateStore({STATE_KEY: _stored("task-from-try-1", "a bay")})
    assert (
        _operator("a bay", wait_for_completion=False).execute({"task_state_store": store})
        == "task-from-try-1"
    )
    assert imagecb_simulator.stats()["submissions_total"] == 0


def test_without_a_state_store_it_warns_once_and_carries_on(imagecb_simulator, capsys):
    result = _operator("a reef").execute({})
    assert result["outcome"] == "success"
    assert capsys.readouterr().out.count("task_state_store is not available") == 1


@pytest.mark.parametrize("failure_mode", ["raise", "return"])
def test_timeout_keeps_the_submission_open_only_when_it_will_be_retried(imagecb_simulator, failure_mode):
    store = DictStateStore()
    op = _operator("a moor [sim:never]", timeout=0.3, failure_mode=failure_mode)
    if failure_mode == "raise":
        with pytest.raises(Exception, match="timeout"):
            op.execute({"task_state_store": store})
        assert store[STATE_KEY]["finished"] is False
    else:
        assert op.execute({"task_state_store": store})["outcome"] == "timeout"
        assert store[STATE_KEY]["finished"] is True
