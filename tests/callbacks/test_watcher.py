"""
The per-event-loop watcher triggers use: many subscribers over one HTTP connection, callbacks that
came before the subscription, a receiver restart in the middle, and a receiver that never answers.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from urllib.parse import urlsplit

import pytest
from cbhelpers import attempts, submit, wait_until

from imagecb_provider.callbacks.client import CallbackItem
from imagecb_provider.callbacks.tokens import callback_url
from imagecb_provider.callbacks.watcher import CallbackInbox, CallbackWatcher

pytestmark = pytest.mark.timeout(120)

QUICK = {"backoff_first": 0.1, "backoff_cap": 0.5, "idle_grace": 0.2}


def _url(settings, slot: int) -> str:
    return callback_url(settings, dag_id="w_dag", run_id="w_run", task_id="wait", slot=slot)


async def _submit_many(settings, count: int, prompt: str) -> list[str]:
    return [await asyncio.to_thread(submit, f"{prompt} {i}", _url(settings, i)) for i in range(count)]


async def _wait_alone(watcher: CallbackWatcher, remote_task_id: str, timeout: float = 60) -> list:
    async with watcher.subscribe([remote_task_id]) as inbox:
        return await inbox.get(timeout=timeout)


async def test_many_waiting_triggers_share_one_long_poll_connection(
    receiver, imagecb_simulator_factory, connect
):
    simulator = imagecb_simulator_factory(latency=2.0, rate_limit_count=1000)
    settings = connect(simulator, receiver.url)
    ids = await _submit_many(settings, 40, "a crowd")
    watcher = CallbackWatcher.for_connection(settings, **QUICK)
    assert CallbackWatcher.for_connection(settings) is watcher  # one per loop and receiver

    results = await asyncio.gather(*(_wait_alone(watcher, remote_task_id) for remote_task_id in ids))

    for remote_task_id, items in zip(ids, results, strict=True):
        assert [item.remote_task_id for item in items] == [remote_task_id]
        assert items[0].record().outcome.value == "success"
        assert items[0].record().result_image_url.startswith(simulator.url)
    long_polls = {port for method, path, port in receiver.requests if path.endswith("/events")}
    lookups = [path for method, path, _ in receiver.requests if path.endswith("/lookup")]
    assert len(long_polls) == 1  # every long-poll of the 40 waits went over one TCP connection
    assert len(lookups) <= 3  # the 40 subscriptions were looked up in a batch or two, not one by one


async def test_a_callback_recorded_before_the_wait_is_found_by_the_lookup(
    receiver, imagecb_simulator_factory, connect
):
    simulator = imagecb_simulator_factory(latency=0.1)
    settings = connect(simulator, receiver.url)
    (early,) = await _submit_many(settings, 1, "an early bird")
    await asyncio.to_thread(wait_until, lambda: attempts(simulator, early), 30, "the early callback")
    watcher = CallbackWatcher.for_connection(settings, **QUICK)
    items = await _wait_alone(watcher, early)
    assert [item.remote_task_id for item in items] == [early]
    await asyncio.to_thread(  # the request log is written once the answer has gone out
        wait_until, lambda: [p for _, p, _ in receiver.requests if p.endswith("/lookup")], 10, "the lookup"
    )


async def test_a_receiver_restart_in_the_middle_loses_nothing(
    start_receiver, imagecb_simulator_factory, connect
):
    receiver = start_receiver()
    simulator = imagecb_simulator_factory(
        latency=1.0, callback_retry_delays=[2.0, 2.0, 2.0], rate_limit_count=100
    )
    settings = connect(simulator, receiver.url)
    watcher = CallbackWatcher.for_connection(settings, **QUICK)
    ids = await _submit_many(settings, 5, "across a restart")
    waits = [asyncio.create_task(_wait_alone(watcher, remote_task_id, timeout=90)) for remote_task_id in ids]
    await asyncio.to_thread(wait_until, lambda: watcher._ready.is_set(), 30, "the watcher to start")

    port = urlsplit(receiver.url).port
    await asyncio.to_thread(receiver.stop)
    for remote_task_id in ids:  # every first delivery finds the receiver down
        await asyncio.to_thread(wait_until, lambda r=remote_task_id: attempts(simulator, r), 30, "a delivery")
    assert all(attempts(simulator, r)[0]["status"] is None for r in ids)
    await asyncio.to_thread(start_receiver, port)

    results = await asyncio.gather(*waits)
    assert [[item.remote_task_id for item in items] for items in results] == [[r] for r in ids]
    assert all(attempts(simulator, r)[-1]["status"] == 200 for r in ids)


async def test_a_receiver_that_never_answers_gives_empty_results_not_errors(imagecb_simulator, connect):
    settings = connect(imagecb_simulator, "http://127.0.0.1:9")  # nothing listens on the discard port
    watcher = CallbackWatcher.for_connection(settings, **QUICK)
    async with watcher.subscribe(["never"]) as inbox:
        assert await inbox.get(timeout=1.0) == []
        assert watcher.running
    await asyncio.sleep(0.5)
    assert not watcher.running  # stopped once nobody waits


async def test_the_loop_stops_when_idle_and_starts_again(receiver, imagecb_simulator_factory, connect):
    simulator = imagecb_simulator_factory(latency=0.5)
    settings = connect(simulator, receiver.url)
    watcher = CallbackWatcher.for_connection(settings, **QUICK)
    (first,) = await _submit_many(settings, 1, "first round")
    assert [i.remote_task_id for i in await _wait_alone(watcher, first)] == [first]
    await asyncio.to_thread(wait_until, lambda: not watcher.running, 10, "the loop to stop")
    (second,) = await _submit_many(settings, 1, "second round")
    assert [i.remote_task_id for i in await _wait_alone(watcher, second)] == [second]


async def test_an_inbox_delivers_each_task_once_and_only_its_own(
    receiver, imagecb_simulator_factory, connect
):
    simulator = imagecb_simulator_factory(latency=1.0, duplicate_callbacks=True)
    settings = connect(simulator, receiver.url)
    mine, theirs = await _submit_many(settings, 2, "one of two")
    watcher = CallbackWatcher.for_connection(settings, **QUICK)
    async with watcher.subscribe([mine]) as inbox, watcher.subscribe([mine, theirs]) as both:
        assert [i.remote_task_id for i in await inbox.get(timeout=60)] == [mine]
        received: list[str] = []
        while len(received) < 2:
            received += [i.remote_task_id for i in await both.get(timeout=60)]
        assert sorted(received) == sorted([mine, theirs])
        await asyncio.to_thread(
            wait_until, lambda: len(attempts(simulator, mine)) >= 2, 30, "the duplicate delivery"
        )
        assert await inbox.get(timeout=0.3) == []


async def test_an_inbox_never_takes_a_callback_of_another_purpose():
    """Even from a receiver that ignored the purpose filter, an asset row never reaches a waiting task."""
    inbox = CallbackInbox(["victim"])
    now = datetime.now(UTC)
    inbox.put(CallbackItem(1, "victim", {}, now, True, code=200, purpose="asset", label="outside"))
    assert await inbox.get(timeout=0.1) == []
    inbox.put(CallbackItem(2, "victim", {}, now, True, code=200))
    assert [item.id for item in await inbox.get(timeout=0.1)] == [2]
