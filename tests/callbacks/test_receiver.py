"""
The receiver over real HTTP, with the project's simulator posting the callbacks the way the vendor
does (signed or not, duplicated, retried), mounted like the plugin on the API server.

Every refusal asserts that nothing was recorded. No timing is asserted: the tests wait for the
simulator's delivery attempts with generous timeouts.
"""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest
from cbhelpers import OTHER_SIGNING_KEYS, attempts, keyring, stored_rows, submit, wait_until
from sqlalchemy.exc import OperationalError

from imagecb_provider.callbacks.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, webhook_signature
from imagecb_provider.callbacks.store import CallbackStore
from imagecb_provider.callbacks.tokens import (
    CALLBACKS_PATH,
    CallbackToken,
    asset_callback_url,
    callback_url,
    watch_token,
)
from imagecb_provider.hooks.imagecb import ImageCbConnectionSettings

pytestmark = pytest.mark.timeout(90)

FAST = {"latency": 0.2, "callback_retry_delays": [0.5, 1.0, 1.0]}


def _ti_url(settings, task_id: str = "generate", **kwargs) -> str:
    return callback_url(settings, dag_id="cb_dag", run_id="cb_run", task_id=task_id, **kwargs)


def _statuses(simulator, remote_task_id: str, count: int) -> list[int | None]:
    found = wait_until(
        lambda: len(attempts(simulator, remote_task_id)) >= count and attempts(simulator, remote_task_id),
        what=f"{count} delivery attempt(s) of {remote_task_id}",
    )
    return [a["status"] for a in found]


# ------------------------------------------------------------------------ accepted callbacks
def test_an_unsigned_callback_is_recorded_before_the_answer(receiver, imagecb_simulator_factory, connect):
    simulator = imagecb_simulator_factory(**FAST)
    settings = connect(simulator, receiver.url)
    remote_task_id = submit("a red kite", _ti_url(settings, slot=2))
    assert _statuses(simulator, remote_task_id, 1) == [200]
    (row,) = stored_rows(remote_task_id)  # committed before the 200 went out
    assert row["signed"] is False
    assert (row["purpose"], row["conn_id"], row["code"]) == ("ti", "imagecb_default", 200)
    assert (row["dag_id"], row["run_id"], row["task_id"], row["map_index"], row["slot"]) == (
        "cb_dag",
        "cb_run",
        "generate",
        -1,
        2,
    )
    body = json.loads(row["body"])
    assert body["data"]["taskId"] == remote_task_id
    assert body["data"]["info"]["resultImageUrl"].startswith(simulator.url)


def test_a_signed_callback_is_verified_and_marked_signed(receiver, imagecb_simulator_factory, connect):
    simulator = imagecb_simulator_factory(webhook_hmac_key="whk-1", **FAST)
    settings = connect(simulator, receiver.url, webhook_hmac_key="whk-1")
    remote_task_id = submit("a signed heron", _ti_url(settings))
    assert _statuses(simulator, remote_task_id, 1) == [200]
    assert stored_rows(remote_task_id)[0]["signed"] is True


def test_a_failed_generation_is_recorded_with_its_code(receiver, imagecb_simulator_factory, connect):
    simulator = imagecb_simulator_factory(**FAST)
    settings = connect(simulator, receiver.url)
    remote_task_id = submit("a rude word [sim:content_policy]", _ti_url(settings))
    assert _statuses(simulator, remote_task_id, 1) == [200]
    (row,) = stored_rows(remote_task_id)
    assert row["code"] == 400
    assert json.loads(row["body"])["data"]["info"]["resultImageUrl"] == ""


def test_an_asset_callback_is_recorded_under_its_label(receiver, imagecb_simulator_factory, connect):
    simulator = imagecb_simulator_factory(**FAST)
    settings = connect(simulator, receiver.url)
    remote_task_id = submit("an outside job", asset_callback_url(settings, "studio"))
    assert _statuses(simulator, remote_task_id, 1) == [200]
    (row,) = stored_rows(remote_task_id)
    assert (row["purpose"], row["label"], row["dag_id"]) == ("asset", "studio", None)


def test_duplicates_are_answered_200_and_recorded_once(receiver, imagecb_simulator_factory, connect):
    simulator = imagecb_simulator_factory(duplicate_callbacks=True, webhook_hmac_key="k", **FAST)
    settings = connect(simulator, receiver.url, webhook_hmac_key="k")
    ids = [submit(f"a twin {i}", _ti_url(settings, slot=i)) for i in range(3)]
    for remote_task_id in ids:
        assert _statuses(simulator, remote_task_id, 2) == [200, 200]
        assert len(stored_rows(remote_task_id)) == 1


def test_a_replayed_callback_is_a_duplicate(receiver, imagecb_simulator_factory, connect):
    simulator = imagecb_simulator_factory(webhook_hmac_key="k", **FAST)
    settings = connect(simulator, receiver.url, webhook_hmac_key="k")
    url = _ti_url(settings)
    remote_task_id = submit("a replayed owl", url)
    _statuses(simulator, remote_task_id, 1)
    answer = _post(url, _body(remote_task_id), headers=_signed("k", remote_task_id))
    assert (answer.status_code, answer.json()) == (200, {"status": "duplicate"})
    assert len(stored_rows(remote_task_id)) == 1


def test_a_callback_whose_first_delivery_found_the_receiver_down_is_recorded_on_retry(
    start_receiver, imagecb_simulator_factory, connect
):
    receiver = start_receiver()
    simulator = imagecb_simulator_factory(latency=0.5, callback_retry_delays=[2.0, 2.0, 2.0])
    settings = connect(simulator, receiver.url)
    port = int(urlsplit(receiver.url).port)
    receiver.stop()
    remote_task_id = submit("a patient crane", _ti_url(settings))
    wait_until(lambda: attempts(simulator, remote_task_id), what="the first delivery")
    assert stored_rows(remote_task_id) == []
    start_receiver(port=port)
    statuses = _statuses(simulator, remote_task_id, 2)
    assert statuses[:2] == [None, 200]  # a refused connection, then the retry
    assert len(stored_rows(remote_task_id)) == 1


class FailingOnce(CallbackStore):
    """The real store, whose first insert fails like a database that went away."""

    failed = False

    def record(self, callback):
        if not self.failed:
            self.failed = True
            raise OperationalError("INSERT", {}, Exception("server closed the connection"))
        return super().record(callback)


def test_a_callback_answered_503_is_recorded_by_the_vendors_retry(
    start_receiver, imagecb_simulator_factory, connect
):
    receiver = start_receiver(store=FailingOnce())
    simulator = imagecb_simulator_factory(**FAST)
    settings = connect(simulator, receiver.url)
    remote_task_id = submit("a stubborn stork", _ti_url(settings))
    assert _statuses(simulator, remote_task_id, 2) == [503, 200]
    assert len(stored_rows(remote_task_id)) == 1


# ------------------------------------------------------------------------ refused callbacks
def _refused_by_simulator(simulator, remote_task_id: str, status: int) -> None:
    """Every attempt (first and retries) got ``status`` and nothing was recorded."""
    assert _statuses(simulator, remote_task_id, 4) == [status] * 4
    assert stored_rows(remote_task_id) == []


def test_a_wrong_webhook_signature_is_refused_401(receiver, imagecb_simulator_factory, connect):
    simulator = imagecb_simulator_factory(webhook_hmac_key="the-vendors-key", **FAST)
    settings = connect(simulator, receiver.url, webhook_hmac_key="another-key")
    _refused_by_simulator(simulator, submit("a forged gull", _ti_url(settings)), 401)


def test_an_unsigned_callback_is_refused_when_a_key_is_configured(
    receiver, imagecb_simulator_factory, connect
):
    simulator = imagecb_simulator_factory(**FAST)
    settings = connect(simulator, receiver.url, webhook_hmac_key="expected")
    _refused_by_simulator(simulator, submit("an unsigned gull", _ti_url(settings)), 401)


def test_a_url_signed_with_keys_the_receiver_lacks_is_refused_403(
    receiver, imagecb_simulator_factory, connect
):
    simulator = imagecb_simulator_factory(**FAST)
    settings = connect(simulator, receiver.url)
    url = _ti_url(settings, keyring=keyring(OTHER_SIGNING_KEYS))
    _refused_by_simulator(simulator, submit("a forged token", url), 403)


def test_an_expired_url_is_refused_410(receiver, imagecb_simulator_factory, connect):
    simulator = imagecb_simulator_factory(**FAST)
    settings = connect(simulator, receiver.url)
    url = _ti_url(settings, expires_in=1, now=time.time() - 3600)
    _refused_by_simulator(simulator, submit("a late swift", url), 410)


# direct posts: what the vendor never sends, but an attacker or a broken proxy may
def _post(url: str, body: bytes | str, *, headers: dict[str, str] | None = None, **kwargs) -> httpx.Response:
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(url, content=body, headers=headers, timeout=30, trust_env=False, **kwargs)


def _body(remote_task_id: str, key: str = "taskId") -> bytes:
    data = {"code": 200, "msg": "success", "data": {key: remote_task_id, "info": {"resultImageUrl": "x"}}}
    return json.dumps(data).encode()


def _signed(key: str, remote_task_id: str, timestamp: int | None = None) -> dict[str, str]:
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    return {TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: webhook_signature(key, remote_task_id, stamp)}


@pytest.fixture
def settings(receiver, imagecb_simulator, connect):
    return connect(imagecb_simulator, receiver.url, webhook_hmac_key="k")


def _unique(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("stale_timestamp", 401),
        ("future_timestamp", 401),
        ("wrong_content_type", 415),
        ("no_content_type", 415),
        ("bad_json", 400),
        ("json_array", 400),
        ("no_data", 422),
        ("no_task_id", 422),
        ("numeric_task_id", 400),
        ("watch_token_as_url", 403),
        ("unknown_connection", 403),
        ("tampered_token", 403),
        ("garbage_token", 403),
    ],
)
def test_bad_requests_get_their_status_and_record_nothing(settings, receiver, case, status):
    remote_task_id = _unique(case)
    url, body, headers = _ti_url(settings), _body(remote_task_id), _signed("k", remote_task_id)
    if case == "stale_timestamp":
        headers = _signed("k", remote_task_id, int(time.time()) - 3600)
    elif case == "future_timestamp":
        headers = _signed("k", remote_task_id, int(time.time()) + 3600)
    elif case == "wrong_content_type":
        headers["Content-Type"] = "text/plain"
    elif case == "no_content_type":
        headers["Content-Type"] = ""
    elif case == "bad_json":
        body = b'{"code": 200, "data": {"taskId": "' + remote_task_id.encode() + b'"'
    elif case == "json_array":
        body = json.dumps([{"data": {"taskId": remote_task_id}}]).encode()
    elif case == "no_data":
        body = json.dumps({"code": 200, "taskId": remote_task_id}).encode()
    elif case == "no_task_id":
        body = json.dumps({"code": 200, "data": {"info": {}}}).encode()
    elif case == "numeric_task_id":
        body = json.dumps({"code": 200, "data": {"taskId": 12345}}).encode()
    elif case == "watch_token_as_url":
        url = f"{receiver.callbacks_url}/{watch_token(settings)}"
    elif case == "unknown_connection":
        other = ImageCbConnectionSettings(conn_id="no_such_conn", base_url="x", api_key=settings.api_key)
        token = _ti_url(
            ImageCbConnectionSettings(**{**other.__dict__, "callback_base_url": receiver.url})
        ).rsplit("/", 1)[1]
        url = f"{receiver.callbacks_url}/{token}"
    elif case == "tampered_token":
        url = url[:-3] + ("AAA" if not url.endswith("AAA") else "BBB")
    elif case == "garbage_token":
        url = f"{receiver.callbacks_url}/not-a-token"
    answer = _post(url, body, headers=headers)
    assert answer.status_code == status, answer.text
    token = url.rsplit("/", 1)[1]
    assert token not in answer.text
    assert stored_rows(remote_task_id) == []


def test_the_task_id_is_also_read_from_task_id(settings):
    remote_task_id = _unique("snake")
    answer = _post(
        _ti_url(settings), _body(remote_task_id, key="task_id"), headers=_signed("k", remote_task_id)
    )
    assert answer.json() == {"status": "recorded"}
    assert len(stored_rows(remote_task_id)) == 1


def test_a_declared_oversized_body_is_refused_before_it_is_sent(settings):
    """Only the headers and a few bytes go out; the 413 comes back without the rest being read."""
    remote_task_id = _unique("huge")
    url = urlsplit(_ti_url(settings))
    head = (
        f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {50 * 1024 * 1024}\r\n{TIMESTAMP_HEADER}: 1\r\n\r\n"
    ).encode()
    answer = _raw_exchange(url.hostname, url.port, head + b'{"data": {"taskId": "' + remote_task_id.encode())
    assert answer.startswith(b"HTTP/1.1 413")
    assert stored_rows(remote_task_id) == []


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit(settings):
    remote_task_id = _unique("chunked")
    url = urlsplit(_ti_url(settings))
    head = (
        f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b" " * 16384
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    # 5 chunks (80 KiB) pass the 64 KiB limit; the terminating chunk is never sent
    answer = _raw_exchange(url.hostname, url.port, head + frame * 5)
    assert answer.startswith(b"HTTP/1.1 413")
    assert stored_rows(remote_task_id) == []


def _raw_exchange(host: str, port: int, data: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(data)
        return sock.recv(65536)


def test_the_token_never_reaches_the_access_log_or_the_answer(settings, receiver, capfd):
    remote_task_id = _unique("quiet")
    url = _ti_url(settings)
    token = url.rsplit("/", 1)[1]
    assert _post(url, _body(remote_task_id), headers=_signed("k", remote_task_id)).status_code == 200
    assert _post(url, b"not json", headers=_signed("k", remote_task_id)).status_code == 400
    # what Airflow's access log middleware prints (recorded once each response has gone out)
    seen_paths = wait_until(
        lambda: [p for m, p, _ in receiver.requests if m == "POST"][1:] and receiver.requests
    )
    assert [path for _, path, _ in seen_paths] == [f"{CALLBACKS_PATH}/***"] * 2
    out, err = capfd.readouterr()
    assert token not in out + err
    assert f"path={CALLBACKS_PATH}/***" in out + err
    assert CallbackToken.verify(token).conn_id == "imagecb_default"


def test_health(receiver):
    answer = httpx.get(f"{receiver.callbacks_url}/health", trust_env=False)
    assert (answer.status_code, answer.json()) == (200, {"status": "ok"})


def test_a_connection_stored_in_the_metadata_database_is_found(callback_db, monkeypatch):
    """The standalone receiver is not an Airflow 'server' process; it must still read DB connections."""
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session

    from imagecb_provider.callbacks.receiver import ConnectionCache, ReceiverError

    monkeypatch.delenv("_AIRFLOW_PROCESS_CONTEXT", raising=False)
    conn_id, other_id = f"imagecb_in_db_{time.monotonic_ns()}", f"http_in_db_{time.monotonic_ns()}"
    with create_session() as session:
        session.add(Connection(conn_id=conn_id, conn_type="imagecb", password="db-key"))
        session.add(Connection(conn_id=other_id, conn_type="http", password="db-key"))
    cache = ConnectionCache()
    assert cache.get(conn_id).api_key == "db-key"
    with pytest.raises(ReceiverError) as refused:
        cache.get(other_id)  # not an imagecb connection: its password is not a token key
    assert refused.value.status_code == 403
