"""
What a holder of an ``asset`` callback URL (handed to systems outside Airflow) cannot do, over real
HTTP: claim the task id of a waiting task, reach that task, flood the store; and what a cursor
update cannot do: move a stream's cursor past its latest row.
"""

from __future__ import annotations

import asyncio
import re
import uuid

import httpx
import pytest
from cbhelpers import stored_rows, wait_until

from imagecb_provider.callbacks.tokens import asset_callback_url, callback_url, watch_token
from imagecb_provider.callbacks.watcher import CallbackWatcher

pytestmark = pytest.mark.timeout(90)

QUICK = {"backoff_first": 0.1, "backoff_cap": 0.5, "idle_grace": 0.2}
FORGED = "https://attacker.example/forged.png"
REAL = "https://files.example/real.png"


@pytest.fixture
def settings(receiver, imagecb_simulator, connect):
    return connect(imagecb_simulator, receiver.url)


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _ti_url(settings) -> str:
    return callback_url(settings, dag_id="abuse_dag", run_id="abuse_run", task_id="wait")


def _post(url: str, remote_task_id: str, result_url: str = REAL) -> httpx.Response:
    """POST a successful callback of ``remote_task_id`` whose result is ``result_url``."""
    body = {
        "code": 200,
        "msg": "success",
        "data": {"taskId": remote_task_id, "info": {"resultImageUrl": result_url}},
    }
    return httpx.post(url, json=body, trust_env=False, timeout=30)


def _auth(settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {watch_token(settings)}"}


def _lookup(receiver, settings, **body) -> list[tuple[str, str]]:
    answer = httpx.post(
        f"{receiver.callbacks_url}/lookup", json=body, headers=_auth(settings), trust_env=False
    )
    assert answer.status_code == 200, answer.text
    return [(i["purpose"], i["body"]["data"]["info"]["resultImageUrl"]) for i in answer.json()["items"]]


def _looked_up(receiver) -> list[str]:
    return [path for _, path, _ in receiver.requests if path.endswith("/lookup")]


# ------------------------------------------------------------------ claiming a task id
async def test_an_asset_url_claiming_a_task_id_neither_blocks_nor_reaches_its_waiting_task(
    receiver, settings
):
    victim = _unique("victim")
    claim = await asyncio.to_thread(_post, asset_callback_url(settings, "outside"), victim, FORGED)
    assert (claim.status_code, claim.json()) == (200, {"status": "recorded"})
    real = await asyncio.to_thread(_post, _ti_url(settings), victim)
    assert (real.status_code, real.json()) == (200, {"status": "recorded"})  # not a "duplicate"
    assert sorted(row["purpose"] for row in stored_rows(victim)) == ["asset", "ti"]

    watcher = CallbackWatcher.for_connection(settings, **QUICK)
    async with watcher.subscribe([victim]) as inbox:
        (item,) = await inbox.get(timeout=30)  # found by the subscription's lookup
        assert await inbox.get(timeout=0.5) == []
    assert (item.remote_task_id, item.purpose, item.record().result_image_url) == (victim, "ti", REAL)


async def test_the_long_poll_of_a_waiting_task_skips_an_asset_row_of_its_task_id(receiver, settings):
    victim = _unique("victim")
    # long-polls of a second: an empty answer, past the asset row, comes back soon
    watcher = CallbackWatcher.for_connection(settings, wait=1.0, **QUICK)
    async with watcher.subscribe([victim]) as inbox:
        await asyncio.to_thread(wait_until, lambda: _looked_up(receiver), 30, "the subscription's lookup")
        claim = await asyncio.to_thread(_post, asset_callback_url(settings, "outside"), victim, FORGED)
        assert claim.status_code == 200
        (asset_row,) = stored_rows(victim)
        await asyncio.to_thread(
            wait_until,
            lambda: (watcher._cursor or 0) >= asset_row["id"],
            30,
            "the long-poll past the asset row",
        )
        assert await inbox.get(timeout=0.5) == []

        await asyncio.to_thread(_post, _ti_url(settings), victim)
        (item,) = await inbox.get(timeout=30)
    assert (item.purpose, item.record().result_image_url) == ("ti", REAL)


def test_the_lookup_and_the_events_answer_ti_rows_unless_asked_for_another_purpose(receiver, settings):
    victim = _unique("victim")
    tail = httpx.get(f"{receiver.callbacks_url}/events", headers=_auth(settings), trust_env=False).json()
    assert _post(asset_callback_url(settings, "outside"), victim, FORGED).status_code == 200
    assert _lookup(receiver, settings, remote_task_ids=[victim]) == []
    assert _lookup(receiver, settings, remote_task_ids=[victim], purpose="asset") == [("asset", FORGED)]

    assert _post(_ti_url(settings), victim).json() == {"status": "recorded"}
    assert _lookup(receiver, settings, remote_task_ids=[victim]) == [("ti", REAL)]
    events = httpx.get(
        f"{receiver.callbacks_url}/events",
        params={"after": tail["cursor"], "purpose": "ti"},
        headers=_auth(settings),
        trust_env=False,
    ).json()
    assert [
        (i["purpose"], i["remote_task_id"]) for i in events["items"] if i["remote_task_id"] == victim
    ] == [("ti", victim)]


# ------------------------------------------------------------------ the quota
def test_the_asset_quota_refuses_the_next_callback_with_429_and_records_nothing(
    start_receiver, imagecb_simulator, connect, monkeypatch
):
    monkeypatch.setenv("AIRFLOW__IMAGECB__ASSET_CALLBACK_QUOTA", "3")
    receiver = start_receiver()
    settings = connect(imagecb_simulator, receiver.url)
    label = _unique("flood")
    url = asset_callback_url(settings, label)
    ids = [f"{label}-{i}" for i in range(4)]
    assert [_post(url, i).json() for i in ids[:3]] == [{"status": "recorded"}] * 3

    refused = _post(url, ids[3])
    assert refused.status_code == 429
    detail = refused.json()["detail"]
    assert re.fullmatch(
        rf"label '{label}' has used its quota of 3 asset callbacks per 86400 seconds; retry in \d+ seconds",
        detail,
    ), detail
    assert 86000 < int(refused.headers["retry-after"]) <= 86400
    assert stored_rows(ids[3]) == []

    assert _post(url, ids[0]).json() == {"status": "duplicate"}  # a retry of a recorded one stops
    assert _post(asset_callback_url(settings, f"{label}-b"), ids[3]).json() == {"status": "recorded"}
    assert _post(_ti_url(settings), ids[3]).json() == {"status": "recorded"}


# ------------------------------------------------------------------ cursors
def test_a_cursor_put_beyond_the_latest_row_is_clamped_and_the_stream_goes_on(receiver, settings):
    label = _unique("stream")
    url = asset_callback_url(settings, label)
    assert _post(url, f"{label}-1").status_code == 200
    (first,) = stored_rows(f"{label}-1")
    name = f"asset:{label}"

    answer = httpx.put(
        f"{receiver.callbacks_url}/cursors/{name}",
        json={"position": first["id"] + 10**9},
        headers=_auth(settings),
        trust_env=False,
    )
    assert answer.json() == {"name": name, "position": first["id"]}

    assert _post(url, f"{label}-2").status_code == 200
    events = httpx.get(
        f"{receiver.callbacks_url}/events",
        params={"after": answer.json()["position"], "purpose": "asset", "label": label},
        headers=_auth(settings),
        trust_env=False,
    ).json()
    assert [i["remote_task_id"] for i in events["items"]] == [f"{label}-2"]
