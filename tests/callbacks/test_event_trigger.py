"""
The asset-watcher trigger for images submitted outside Airflow, driven by Airflow's own shared-stream
manager the way the triggerer drives it (subscribe, filter, bind each event, confirm it persisted),
with the simulator posting real callbacks to ``asset`` URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from airflow.triggers.shared_stream import SharedStreamManager
from cbhelpers import stored_rows, submit, wait_until

from imagecb_provider.callbacks.store import CallbackStore
from imagecb_provider.callbacks.tokens import asset_callback_url
from imagecb_provider.triggers import callback_event
from imagecb_provider.triggers.callback_event import (
    ImageCallbackEventTrigger,
    cursor_name,
    result_from_event,
)

pytestmark = pytest.mark.timeout(120)


class Triggerer:
    """The slice of Airflow's TriggerRunner that runs shared-stream triggers, with manual persistence."""

    def __init__(self) -> None:
        self.manager = SharedStreamManager(ack_timeout=60)
        self.events: asyncio.Queue[tuple[dict[str, Any], int | None]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, trigger: ImageCallbackEventTrigger, trigger_id: int = 1) -> None:
        self._tasks.append(asyncio.create_task(self._run(trigger, trigger_id)))

    async def _run(self, trigger: ImageCallbackEventTrigger, trigger_id: int) -> None:
        key = trigger.shared_stream_key()
        stream = self.manager.subscribe(trigger_id=trigger_id, trigger=trigger, key=key)
        try:
            async for event in trigger.filter_shared_stream(stream):
                seq = self.manager.bind_pending_event(trigger_id=trigger_id, key=key)
                self.events.put_nowait((event.payload, seq))
        finally:
            await self.manager.unsubscribe(trigger_id, key)

    async def next(self, *, persist: bool = True) -> dict[str, Any]:
        payload, seq = await asyncio.wait_for(self.events.get(), 60)
        if persist and seq is not None:
            self.manager.confirm_persisted([seq])  # what the supervisor does once the event is stored
        return payload

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.manager.stop_all()


@pytest.fixture
def label() -> str:
    return f"lbl-{time.monotonic_ns()}"


@pytest.fixture
def settings(receiver, imagecb_simulator_factory, connect):
    simulator = imagecb_simulator_factory(latency=0.2, rate_limit_count=1000)
    return connect(simulator, receiver.url)


async def _submit_recorded(settings, label: str, prompt: str) -> str:
    remote_task_id = await asyncio.to_thread(submit, prompt, asset_callback_url(settings, label))
    await asyncio.to_thread(wait_until, lambda: stored_rows(remote_task_id), 30, "the callback")
    return remote_task_id


def _cursor(label: str | None) -> int | None:
    return CallbackStore().cursor("imagecb_default", cursor_name(label))


def _callback_id(remote_task_id: str) -> int:
    return stored_rows(remote_task_id)[0]["id"]


async def _cursor_reaches(label: str, position: int) -> None:
    await asyncio.to_thread(
        wait_until, lambda: (_cursor(label) or 0) >= position, 30, f"the cursor to reach {position}"
    )


async def test_each_callback_fires_one_event_and_the_cursor_moves_once_it_is_stored(settings, label):
    triggerer = Triggerer()
    triggerer.start(ImageCallbackEventTrigger(label=label))
    try:
        ids = [await _submit_recorded(settings, label, f"outside {i}") for i in range(3)]
        await _submit_recorded(settings, f"{label}-other", "another label")
        payloads = [await triggerer.next() for _ in ids]
        assert [p["remote_task_id"] for p in payloads] == ids
        first = payloads[0]
        assert (first["label"], first["code"], first["outcome"], first["signed"]) == (
            label,
            200,
            "success",
            False,
        )
        assert first["result_image_url"].startswith("http://")
        assert first["callback_id"] == _callback_id(ids[0])
        await _cursor_reaches(label, _callback_id(ids[-1]))
        assert triggerer.events.empty()
    finally:
        await triggerer.stop()


async def test_a_restart_neither_re_emits_nor_misses_events(settings, label):
    before = Triggerer()
    before.start(ImageCallbackEventTrigger(label=label))
    first = await _submit_recorded(settings, label, "before the restart")
    assert (await before.next())["remote_task_id"] == first
    await _cursor_reaches(label, _callback_id(first))
    await before.stop()

    while_down = [await _submit_recorded(settings, label, f"while down {i}") for i in range(2)]

    after = Triggerer()
    after.start(ImageCallbackEventTrigger(label=label))
    try:
        assert [(await after.next())["remote_task_id"] for _ in while_down] == while_down
        later = await _submit_recorded(settings, label, "after the restart")
        assert (await after.next())["remote_task_id"] == later
    finally:
        await after.stop()


async def test_an_event_never_confirmed_stored_is_read_again_after_a_restart(settings, label):
    crashed = Triggerer()
    crashed.start(ImageCallbackEventTrigger(label=label))
    remote_task_id = await _submit_recorded(settings, label, "not stored")
    assert (await crashed.next(persist=False))["remote_task_id"] == remote_task_id
    await crashed.stop()
    assert _cursor(label) is None or _cursor(label) < _callback_id(remote_task_id)

    again = Triggerer()
    again.start(ImageCallbackEventTrigger(label=label))
    try:
        assert (await again.next())["remote_task_id"] == remote_task_id
        await _cursor_reaches(label, _callback_id(remote_task_id))
    finally:
        await again.stop()


async def test_triggers_of_one_label_share_one_stream(settings, label):
    triggerer = Triggerer()
    triggerer.start(ImageCallbackEventTrigger(label=label), trigger_id=1)
    triggerer.start(ImageCallbackEventTrigger(label=label), trigger_id=2)
    try:
        remote_task_id = await _submit_recorded(settings, label, "seen twice")
        got = [await triggerer.next(), await triggerer.next()]
        assert [p["remote_task_id"] for p in got] == [remote_task_id] * 2
        assert len(triggerer.manager._groups) == 1
        await _cursor_reaches(label, _callback_id(remote_task_id))
    finally:
        await triggerer.stop()


async def test_run_without_the_shared_stream_also_advances(settings, label, monkeypatch):
    monkeypatch.setattr(callback_event, "PERSIST_GRACE", 0.1)
    events = ImageCallbackEventTrigger(label=label).run()
    try:
        remote_task_id = await _submit_recorded(settings, label, "standalone")
        event = await asyncio.wait_for(anext(events), 60)
        assert event.payload["remote_task_id"] == remote_task_id
        pending = asyncio.ensure_future(anext(events))  # the triggerer asks for the next event
        await _cursor_reaches(label, _callback_id(remote_task_id))
        pending.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await pending
    finally:
        await events.aclose()


async def test_an_unreachable_receiver_is_retried_not_raised(imagecb_simulator, connect, label):
    connect(imagecb_simulator, "http://127.0.0.1:9")
    producer = callback_event.AssetCallbackProducer(label=label, backoff_first=0.05, backoff_cap=0.1)
    stream = producer.open_stream()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(stream), 1.0)
    await stream.aclose()
    await producer.aclose()


def test_the_trigger_serializes_only_ids():
    trigger = ImageCallbackEventTrigger(imagecb_conn_id="imagecb_default", label="studio")
    classpath, kwargs = trigger.serialize()
    assert classpath == "imagecb_provider.triggers.callback_event.ImageCallbackEventTrigger"
    assert kwargs == {"imagecb_conn_id": "imagecb_default", "label": "studio"}
    assert ImageCallbackEventTrigger(**kwargs).shared_stream_key() == trigger.shared_stream_key()
    with pytest.raises(ValueError, match="label"):
        ImageCallbackEventTrigger(label="no spaces please")


def test_a_result_built_from_an_event_is_archived(receiver, imagecb_simulator, connect, tmp_path):
    from imagecb_provider.operators.archive import ImageArchiveOperator

    settings = connect(imagecb_simulator, receiver.url)
    remote_task_id = submit("to be archived", asset_callback_url(settings, "studio"))
    wait_until(lambda: stored_rows(remote_task_id), what="the callback")
    payload = callback_event.event_payload(
        callback_event.CallbackItem.from_json(
            CallbackStore().lookup("imagecb_default", [remote_task_id])[0].to_json()
        )
    )
    result = result_from_event(payload)
    assert (result["task_id"], result["outcome"], result["via"]) == (remote_task_id, "success", "callback")
    archived = ImageArchiveOperator(task_id="archive", results=[result], destination=str(tmp_path)).execute(
        {}
    )
    assert [f["source"] for f in archived[0]["files"]] == ["result", "origin"]
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == 2


@pytest.mark.airflow
def test_the_example_dag_is_scheduled_on_a_watched_asset():
    from pathlib import Path

    from airflow.dag_processing.dagbag import DagBag

    dags = Path(__file__).resolve().parents[2] / "dags" / "imagecb_callback_assets.py"
    bag = DagBag(dag_folder=str(dags))
    assert bag.import_errors == {}
    dag = bag.dags["imagecb_callback_assets"]
    (asset,) = dag.timetable.asset_condition.objects
    (watcher,) = asset.watchers
    assert isinstance(watcher.trigger, ImageCallbackEventTrigger)
    assert watcher.trigger.label == "studio"
    assert {t.task_id for t in dag.tasks} == {"results_from_events", "archive"}
