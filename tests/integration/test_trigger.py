"""ImageTaskTrigger against the simulator: every outcome, many tasks at once, faults, the deadline."""

from __future__ import annotations

import asyncio
import time

import pytest

from imagecb_provider.hooks.imagecb import ImageCbAsyncHook, ImageCbHook
from imagecb_provider.hooks.protocol import RetryPolicy
from imagecb_provider.models import GenerationRequest
from imagecb_provider.triggers.task import ImageTaskTrigger

pytestmark = pytest.mark.timeout(60)


def _submit(prompt: str) -> str:
    return ImageCbHook().submit(GenerationRequest(prompt=prompt))


async def _events(trigger: ImageTaskTrigger) -> list[dict]:
    return [event.payload async for event in trigger.run()]


def _trigger(
    *remote_task_ids: str, timeout: float = 10.0, poll_interval: float = 0.1, **kwargs
) -> ImageTaskTrigger:
    return ImageTaskTrigger(
        remote_task_ids=list(remote_task_ids),
        deadline=time.time() + timeout,
        poll_interval=poll_interval,
        **kwargs,
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
    record = event["records"][remote_task_id]
    assert (record["outcome"], record["code"], record["task_id"]) == (outcome, code, remote_task_id)
    assert event["polls"][remote_task_id] == imagecb_simulator.stats()["status_calls"][remote_task_id]
    assert event["via"] == {remote_task_id: "poll"}
    assert bool(record["result_image_url"]) == (outcome == "success")


async def test_one_trigger_waits_for_many_tasks_each_on_its_own_schedule(imagecb_simulator):
    fast = _submit("a quick sketch [sim:latency=0.1]")
    slow = _submit("a slow fresco [sim:latency=1.0]")
    failed = _submit("a flagged one [sim:content_policy]")
    events = await _events(_trigger(fast, slow, failed, poll_interval=0.2, echo={"back": [1, 2]}))
    assert len(events) == 1
    event = events[0]
    assert event["status"] == "done"
    assert {k: r["outcome"] for k, r in event["records"].items()} == {
        fast: "success",
        slow: "success",
        failed: "content_policy",
    }
    calls = imagecb_simulator.stats()["status_calls"]
    assert event["polls"] == {fast: calls[fast], slow: calls[slow], failed: calls[failed]}
    assert calls[slow] > calls[fast]  # the slow one was polled until it ended; the fast one stopped early
    assert event["echo"] == {"back": [1, 2]}


async def test_a_task_reconnected_to_is_polled_at_once(imagecb_simulator):
    imagecb_simulator.configure(latency=0.0)
    remote_task_id = _submit("an ended task")
    trigger = _trigger(remote_task_id, poll_interval=30, first_poll_at={remote_task_id: 0})
    events = await asyncio.wait_for(_events(trigger), timeout=10)  # not 30 s: the first poll is immediate
    assert events[0]["records"][remote_task_id]["outcome"] == "success"
    assert events[0]["polls"] == {remote_task_id: 1}


async def test_trigger_rides_out_transient_faults(imagecb_simulator):
    imagecb_simulator.configure(latency=0.5, fault_rate=0.5, seed=7)
    remote_task_id = _submit("a drum")
    events = await _events(_trigger(remote_task_id, poll_interval=0.1))
    assert [e["status"] for e in events] == ["done"]
    assert events[0]["records"][remote_task_id]["outcome"] == "success"
    assert sum(imagecb_simulator.stats()["faults"].values()) > 0


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
    assert events[0]["polls"] == {
        remote_task_id: 3
    }  # two polls failed after 3 attempts each; the third got through
    assert imagecb_simulator.stats()["status_calls"][remote_task_id] == 9


async def test_trigger_times_out_with_an_event_not_an_exception(imagecb_simulator):
    done = _submit("a bell")
    stuck = _submit("a harp [sim:never]")
    events = await _events(_trigger(done, stuck, timeout=0.6, poll_interval=0.2))
    assert len(events) == 1
    assert events[0]["status"] == "timeout"
    assert set(events[0]["records"]) == {done}  # the ended one is reported, the stuck one is not
    assert events[0]["polls"][stuck] >= 2


async def test_trigger_reports_permanent_errors_as_an_event(imagecb_simulator):
    events = await _events(_trigger("no-such-task"))
    assert len(events) == 1
    event = events[0]
    assert event["status"] == "error"
    error = event["error"]
    assert (error["code"], error["error_type"], error["remote_task_id"]) == (
        404,
        "ImageCbTaskUnknown",  # an ImageCbNotFound, whichever of the API's forms said it
        "no-such-task",
    )
    assert error["endpoint"] == "/api/v1/flux/kontext/record-info"
    assert "unknown" in error["message"]
    assert (event["polls"], event["records"]) == ({"no-such-task": 1}, {})


async def test_many_triggers_share_one_event_loop(imagecb_simulator):
    imagecb_simulator.configure(latency=0.5, rate_limit_count=1000)
    ids = [_submit(f"a star {i}") for i in range(50)]
    results = await asyncio.wait_for(
        asyncio.gather(*(_events(_trigger(i, poll_interval=0.2)) for i in ids)),
        timeout=20,  # one after another, 50 waits of at least 0.5 s could not end in time
    )
    assert all(r[0]["records"][i]["outcome"] == "success" for r, i in zip(results, ids, strict=True))


async def test_later_waits_poll_an_image_when_it_should_be_done(imagecb_simulator, monkeypatch):
    """What one group learned of render times spares the next a whole poll interval."""
    from imagecb_provider.triggers import task as trigger_module

    monkeypatch.setattr(trigger_module, "RENDER_TIMES", trigger_module.RenderTimes())
    imagecb_simulator.configure(latency=2.0)
    first = _submit("a first render")
    await _events(_trigger(first, poll_interval=0.5))  # learns: about 2 s
    assert trigger_module.RENDER_TIMES.estimate("imagecb_default") == pytest.approx(2.0, abs=1.0)

    later = _submit("a later render")
    trigger = _trigger(later, poll_interval=30, submitted_at={later: time.time()})
    events = await asyncio.wait_for(_events(trigger), timeout=15)  # not 30 s
    assert events[0]["records"][later]["outcome"] == "success"
    assert events[0]["polls"][later] <= 1 + trigger_module.LATE_POLLS  # the expected-end poll, and late ones
