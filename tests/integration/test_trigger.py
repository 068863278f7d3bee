"""ImageTaskTrigger against the simulator: every outcome, transient faults, the deadline."""

from __future__ import annotations

import asyncio
import time

import pytest

from imagecb_provider.hooks.imagecb import ImageCbAsyncHook, ImageCbHook
from imagecb_provider.hooks.protocol import RetryPolicy
from imagecb_provider.models import GenerationRequest
from imagecb_provider.triggers.task import ImageTaskTrigger


def _submit(prompt: str) -> str:
    return ImageCbHook().submit(GenerationRequest(prompt=prompt))


async def _events(trigger: ImageTaskTrigger) -> list[dict]:
    return [event.payload async for event in trigger.run()]


def _trigger(remote_task_id: str, *, timeout: float = 10.0, poll_interval: float = 0.1) -> ImageTaskTrigger:
    return ImageTaskTrigger(
        remote_task_id=remote_task_id, deadline=time.time() + timeout, poll_interval=poll_interval
    )


@pytest.mark.parametrize(
    ("marker", "outcome", "code"),
    [
        ("", "success", 200),
        ("[sim:content_policy]", "content_policy", 400),
        ("[sim:internal_error]", "internal_error", 500),
        ("[sim:upstream_timeout]", "internal_error", 408),
        ("[sim:generation_failed]", "generation_failed", 501),
        ("[sim:create_failed]", "internal_error", None),
    ],
)
async def test_trigger_fires_exactly_one_event_with_the_outcome(imagecb_simulator, marker, outcome, code):
    remote_task_id = _submit(f"a kite {marker}")
    events = await _events(_trigger(remote_task_id))
    assert len(events) == 1
    event = events[0]
    assert event["status"] == "done"
    assert event["record"]["outcome"] == outcome
    assert event["record"]["code"] == code
    assert event["record"]["task_id"] == remote_task_id
    assert event["polls"] == imagecb_simulator.stats()["status_calls"][remote_task_id]
    if outcome == "success":
        assert event["record"]["result_image_url"]


async def test_trigger_rides_out_transient_faults(imagecb_simulator):
    imagecb_simulator.configure(latency=0.5, fault_rate=0.5, seed=7)
    remote_task_id = _submit("a drum")
    events = await _events(_trigger(remote_task_id, poll_interval=0.1))
    assert [e["status"] for e in events] == ["done"]
    assert events[0]["record"]["outcome"] == "success"


class QuickRetryTrigger(ImageTaskTrigger):
    """The same trigger with a hook that gives up after 3 quick attempts per status call."""

    def _hook(self) -> ImageCbAsyncHook:
        return ImageCbAsyncHook(
            retry_policy=RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.02, jitter=0)
        )


async def test_trigger_keeps_polling_through_an_outage_longer_than_hook_retries(imagecb_simulator):
    imagecb_simulator.configure(latency=0.0)
    remote_task_id = _submit("a flute")
    imagecb_simulator.inject(endpoint="record-info", code=455, times=8)
    trigger = QuickRetryTrigger(remote_task_id=remote_task_id, deadline=time.time() + 10, poll_interval=0.05)
    events = await _events(trigger)
    assert events[0]["status"] == "done"
    assert events[0]["polls"] == 3  # two status calls failed after 3 attempts each; the third got through
    assert imagecb_simulator.stats()["status_calls"][remote_task_id] == 9


async def test_trigger_times_out_with_an_event_not_an_exception(imagecb_simulator):
    remote_task_id = _submit("a harp [sim:never]")
    started = time.monotonic()
    events = await _events(_trigger(remote_task_id, timeout=0.6, poll_interval=0.2))
    assert time.monotonic() - started < 2
    assert len(events) == 1
    assert events[0]["status"] == "timeout"
    assert events[0]["record"]["state"] == "generating"
    assert events[0]["polls"] >= 2


async def test_trigger_reports_permanent_errors_as_an_event(imagecb_simulator):
    events = await _events(_trigger("no-such-task"))
    assert len(events) == 1
    event = events[0]
    assert (event["status"], event["code"], event["error_type"]) == ("error", 404, "ImageCbNotFound")
    assert (event["polls"], event["remote_task_id"], event["record"]) == (1, "no-such-task", None)
    assert event["endpoint"] == "/api/v1/flux/kontext/record-info"
    assert "unknown" in event["message"]


async def test_many_triggers_share_one_event_loop(imagecb_simulator):
    imagecb_simulator.configure(latency=0.5, rate_limit_count=1000)
    ids = [_submit(f"a star {i}") for i in range(50)]
    started = time.monotonic()
    results = await asyncio.gather(*(_events(_trigger(i, poll_interval=0.2)) for i in ids))
    elapsed = time.monotonic() - started
    assert all(r[0]["record"]["outcome"] == "success" for r in results)
    assert elapsed < 15  # concurrent: waited one after another, 50 waits of 0.5 s take 25 s or more
