"""
The events endpoints the triggerer reads: the long-poll, the lookup and the consumer cursors, over
real HTTP with a ``watch`` bearer token, fed by the simulator's callbacks.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from cbhelpers import OTHER_SIGNING_KEYS, attempts, keyring, stored_rows, submit, wait_until
from store_checks import new_callback

from imagecb_provider.callbacks.store import CallbackStore
from imagecb_provider.callbacks.tokens import asset_callback_url, callback_url, watch_token
from imagecb_provider.hooks.imagecb import ImageCbConnectionSettings

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def simulator(imagecb_simulator_factory):
    return imagecb_simulator_factory(latency=0.3, callback_retry_delays=[0.5, 0.5, 0.5])


@pytest.fixture
def settings(receiver, simulator, connect):
    return connect(simulator, receiver.url)


def _auth(settings, **kwargs) -> dict[str, str]:
    return {"Authorization": f"Bearer {watch_token(settings, **kwargs)}"}


def _get(url: str, headers: dict[str, str] | None = None, **params) -> httpx.Response:
    return httpx.get(url, params=params, headers=headers or {}, timeout=90, trust_env=False)


def _ti_url(settings, slot: int = 0) -> str:
    return callback_url(settings, dag_id="ev_dag", run_id="ev_run", task_id="t", slot=slot)


def _recorded(simulator, remote_task_id: str) -> None:
    wait_until(lambda: stored_rows(remote_task_id), what=f"the callback of {remote_task_id}")
    assert attempts(simulator, remote_task_id)[0]["status"] == 200


# ------------------------------------------------------------------------------ auth
@pytest.mark.parametrize("path", ["/events", "/cursors/asset:*"])
def test_the_events_endpoints_need_a_watch_token(receiver, settings, path):
    url = f"{receiver.callbacks_url}{path}"
    for headers in (
        {},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer garbage"},
        {"Authorization": f"Bearer {_ti_url(settings).rsplit('/', 1)[1]}"},  # a callback token
        _auth(settings, expires_in=1, now=time.time() - 60),  # expired
        _auth(settings, keyring=keyring(OTHER_SIGNING_KEYS)),  # signed with keys not configured
    ):
        answer = _get(url, headers)
        assert answer.status_code == 401, headers
        assert answer.headers["www-authenticate"] == "Bearer"
    assert _get(url, _auth(settings)).status_code == 200


def test_lookup_needs_a_watch_token(receiver, settings):
    answer = httpx.post(f"{receiver.callbacks_url}/lookup", json={"remote_task_ids": []}, trust_env=False)
    assert answer.status_code == 401


# ------------------------------------------------------------------------------ long-poll
def test_a_new_reader_starts_at_the_end_of_the_log(receiver, simulator, settings):
    remote_task_id = submit("before the reader", _ti_url(settings))
    _recorded(simulator, remote_task_id)
    tail = _get(f"{receiver.callbacks_url}/events", _auth(settings)).json()
    assert tail["items"] == []
    assert tail["cursor"] >= stored_rows(remote_task_id)[0]["id"]
    empty = _get(f"{receiver.callbacks_url}/events", _auth(settings), after=tail["cursor"], wait=0.2).json()
    assert empty == {"items": [], "cursor": tail["cursor"]}


async def test_the_long_poll_answers_when_a_callback_is_recorded(receiver, simulator, settings):
    async with httpx.AsyncClient(trust_env=False, timeout=90) as http:
        tail = (await http.get(f"{receiver.callbacks_url}/events", headers=_auth(settings))).json()["cursor"]
        poll = asyncio.create_task(
            http.get(
                f"{receiver.callbacks_url}/events",
                headers=_auth(settings),
                params={"after": tail, "wait": 50},
            )
        )
        remote_task_id = await asyncio.to_thread(submit, "while polling", _ti_url(settings))
        answer = (await poll).json()
    (item,) = [i for i in answer["items"] if i["remote_task_id"] == remote_task_id]
    assert item["purpose"] == "ti"
    assert item["code"] == 200
    assert item["signed"] is False
    assert item["body"]["data"]["taskId"] == remote_task_id
    assert answer["cursor"] >= item["id"] > tail


def test_events_are_filtered_by_connection_purpose_and_label(
    receiver, simulator, settings, connect, monkeypatch
):
    tail = _get(f"{receiver.callbacks_url}/events", _auth(settings)).json()["cursor"]
    ti_id = submit("for a task", _ti_url(settings))
    studio_id = submit("for the studio", asset_callback_url(settings, "studio"))
    other_id = submit("for elsewhere", asset_callback_url(settings, "elsewhere"))
    for remote_task_id in (ti_id, studio_id, other_id):
        _recorded(simulator, remote_task_id)

    def ids(headers, **params) -> list[str]:
        answer = _get(f"{receiver.callbacks_url}/events", headers, after=tail, **params).json()
        return [i["remote_task_id"] for i in answer["items"]]

    assert {ti_id, studio_id, other_id} <= set(ids(_auth(settings)))
    assert ti_id in ids(_auth(settings), purpose="ti")
    assert studio_id not in ids(_auth(settings), purpose="ti")
    assert ids(_auth(settings), purpose="asset", label="studio") == [studio_id]

    monkeypatch.setenv("AIRFLOW_CONN_IMAGECB_OTHER", '{"conn_type": "imagecb", "password": "other-key"}')
    other_conn = ImageCbConnectionSettings(conn_id="imagecb_other", base_url="x", api_key="other-key")
    assert ids(_auth(other_conn)) == []


def test_a_long_poll_sees_callbacks_recorded_by_another_replica(start_receiver, simulator, connect):
    """Two API servers on one database: the long-poll on one wakes for a callback posted to the other."""
    first, second = start_receiver(), start_receiver()
    settings = connect(simulator, second.url)
    tail = _get(f"{first.callbacks_url}/events", _auth(settings)).json()["cursor"]
    remote_task_id = submit("posted to the second replica", _ti_url(settings))
    answer = _get(f"{first.callbacks_url}/events", _auth(settings), after=tail, wait=50).json()
    assert remote_task_id in [i["remote_task_id"] for i in answer["items"]]
    assert all(method != "POST" for method, _, _ in first.requests)


def test_a_full_page_returns_its_last_id_as_the_cursor(receiver, simulator, settings):
    tail = _get(f"{receiver.callbacks_url}/events", _auth(settings)).json()["cursor"]
    ids = [submit(f"page {i}", _ti_url(settings, slot=i)) for i in range(3)]
    for remote_task_id in ids:
        _recorded(simulator, remote_task_id)
    seen: list[str] = []
    cursor = tail
    while len(seen) < 3:
        answer = _get(
            f"{receiver.callbacks_url}/events", _auth(settings), after=cursor, limit=1, wait=5
        ).json()
        assert len(answer["items"]) <= 1
        seen += [i["remote_task_id"] for i in answer["items"]]
        cursor = answer["cursor"]
    assert seen == sorted(ids, key=lambda r: stored_rows(r)[0]["id"])  # in recording order, each once


# ------------------------------------------------------------------------------ lookup
def test_lookup_returns_what_was_recorded_for_given_ids(receiver, simulator, settings):
    first = submit("looked up 1", _ti_url(settings))
    second = submit("looked up 2", _ti_url(settings, slot=1))
    for remote_task_id in (first, second):
        _recorded(simulator, remote_task_id)
    answer = httpx.post(
        f"{receiver.callbacks_url}/lookup",
        json={"remote_task_ids": [first, "never-seen", second]},
        headers=_auth(settings),
        trust_env=False,
    )
    assert answer.status_code == 200
    assert sorted(i["remote_task_id"] for i in answer.json()["items"]) == sorted([first, second])


@pytest.mark.parametrize(
    "body",
    [
        {"remote_task_ids": "abc"},
        {"remote_task_ids": [1, 2]},
        {"remote_task_ids": ["x"] * 1001},
        {},
        {"remote_task_ids": ["x"], "purpose": "watch"},
    ],
)
def test_a_bad_lookup_is_refused_422(receiver, settings, body):
    answer = httpx.post(
        f"{receiver.callbacks_url}/lookup", json=body, headers=_auth(settings), trust_env=False
    )
    assert answer.status_code == 422


# ------------------------------------------------------------------------------ cursors
def test_a_cursor_only_moves_forward_and_never_past_the_latest_row(receiver, settings):
    url = f"{receiver.callbacks_url}/cursors/test:{time.monotonic_ns()}"
    assert _get(url, _auth(settings)).json()["position"] is None
    store = CallbackStore()
    first, second = (
        store.record(new_callback(f"cursor-{time.monotonic_ns()}-{i}", settings.conn_id)) for i in range(2)
    )

    def put(position) -> httpx.Response:
        return httpx.put(url, json={"position": position}, headers=_auth(settings), trust_env=False)

    assert put(second).json()["position"] == second
    assert put(first).json()["position"] == second
    # a name of no asset stream follows every row of the connection (the two, or a later one)
    latest = max(row.id for row in store.after(settings.conn_id, second - 1)[0])
    assert put(latest + 10**6).json()["position"] == latest
    assert _get(url, _auth(settings)).json()["position"] == latest
    assert put(-1).status_code == 422
    assert put("7").status_code == 422
    assert _get(f"{receiver.callbacks_url}/cursors/bad name!", _auth(settings)).status_code == 422
