"""
The receiver against strangers, over real HTTP, mounted like the plugin on the API server: one
test per finding of the security review, each failing on the receiver as it was before the fix.

1. a forged token costs no connection lookup and leaves nothing cached, and the cache is bounded;
2. tokens are signed with keys of the provider's own: the vendor's API key mints nothing, keys
   rotate with two valid at once, and an asset label can be revoked;
   every refusal of a token is the same 403;
3. no body or header makes the receiver answer 500;
4. (the access log: ``test_receiver_logs.py``)
5. a remote task id of any other form than the strict one is refused with 400.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import time

import httpx
import pytest
from cbhelpers import callback_body, keyring, stored_rows

from imagecb_provider.callbacks.receiver import ConnectionCache, ReceiverError
from imagecb_provider.callbacks.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, webhook_signature
from imagecb_provider.callbacks.tokens import asset_callback_url, callback_url, watch_token
from imagecb_provider.hooks.imagecb import ImageCbConnectionSettings

pytestmark = pytest.mark.timeout(180)

API_KEY = "the-vendor-knows-this-api-key"
WEBHOOK_KEY = "the-webhook-hmac-key"
REFUSED = (403, {"detail": "callback token is not valid"})


class CountingConnections(ConnectionCache):
    """The receiver's connection cache, counting the lookups that reach Airflow's secrets backends."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.lookups: list[str] = []

    def _load(self, conn_id):
        self.lookups.append(conn_id)
        return super()._load(conn_id)


@pytest.fixture
def served(start_receiver, monkeypatch):
    """A receiver counting its connection lookups, with ``imagecb_default`` and ``imagecb_signed``."""
    connections = CountingConnections()
    handle = start_receiver(connections=connections)
    for name, extra in (("DEFAULT", {}), ("SIGNED", {"webhook_hmac_key": WEBHOOK_KEY})):
        conn = {
            "conn_type": "imagecb",
            "password": API_KEY,
            "extra": {"callback_base_url": handle.url, **extra},
        }
        monkeypatch.setenv(f"AIRFLOW_CONN_IMAGECB_{name}", json.dumps(conn))
    handle.connections = connections
    handle.settings = _settings(handle, "imagecb_default")
    handle.signed = _settings(handle, "imagecb_signed")
    return handle


def _settings(handle, conn_id: str) -> ImageCbConnectionSettings:
    return ImageCbConnectionSettings(
        conn_id=conn_id, base_url="http://sim", api_key=API_KEY, callback_base_url=handle.url
    )


def _token(url: str) -> str:
    return url.rsplit("/", 1)[1]


def _unique(name: str) -> str:
    return f"{name}-{time.monotonic_ns()}"


def _post(handle, token: str, body: bytes, headers: dict | list | None = None) -> httpx.Response:
    """POST to ``token``'s URL over HTTP; a list of ``headers`` is sent after a JSON content type."""
    pairs: list = [("Content-Type", "application/json")]
    if isinstance(headers, dict):
        pairs = [(name, value) for name, value in pairs if name not in headers] + list(headers.items())
    elif headers:
        pairs += headers
    return httpx.post(
        f"{handle.callbacks_url}/{token}", content=body, headers=pairs, trust_env=False, timeout=30
    )


def _in_process(handle, token: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> httpx.Response:
    """
    POST through the app in this process, with ``headers`` exactly as given: what an HTTP server
    that passes any header through (or a proxy in front) hands the app.
    """
    import asyncio

    from imagecb_provider.callbacks.app import create_app

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(create_app(handle.receiver), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://receiver") as http:
            request = http.build_request("POST", f"/callbacks/{token}", content=body)
            request.headers = httpx.Headers([(b"content-type", b"application/json"), *headers])
            return await http.send(request)

    return asyncio.run(send())


def _answer(response: httpx.Response) -> tuple[int, object]:
    return response.status_code, response.json()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _with_connection(token: str, conn_id: str) -> str:
    """The token with another connection id in its payload, its signature parts kept (a forgery)."""
    parts = token.split(".")
    for index, part in enumerate(parts):
        try:
            fields = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        except ValueError:
            continue
        if isinstance(fields, list):
            fields[2] = conn_id
            parts[index] = _b64(json.dumps(fields, separators=(",", ":")).encode())
            return ".".join(parts)
    raise AssertionError("no payload in the token")


def _minted_with_the_api_key(conn_id: str, label: str, api_key: str = API_KEY) -> list[str]:
    """
    Asset tokens the vendor can make knowing only the API key: the version 1 scheme (a key
    derived from the API key), and the current layout signed with keys derived from it.
    """
    fields = [1, "asset", conn_id, int(time.time()) + 3600, label]
    payload = _b64(json.dumps(fields, separators=(",", ":")).encode())
    key = hmac.new(api_key.encode(), b"imagecb callback token v1", hashlib.sha256).digest()
    grant = _b64(
        hmac.new(
            key, b"imagecb-grant." + json.dumps(fields, separators=(",", ":")).encode(), "sha256"
        ).digest()
    )
    tag = _b64(hmac.new(key, b"imagecb-tag." + payload.encode(), hashlib.sha256).digest()[:16])
    minted = [f"{payload}.{grant}.{tag}"]
    for secret in (api_key, hashlib.sha256(api_key.encode()).hexdigest(), key.hex()):
        fields[0] = 2
        payload = _b64(json.dumps(fields, separators=(",", ":")).encode())
        for kid in ("t1", "f" + _b64(key)[:5]):
            signing = hmac.new(secret.encode(), b"imagecb callback token v2", hashlib.sha256).digest()
            grant = _b64(hmac.new(signing, b"imagecb-grant." + payload.encode(), hashlib.sha256).digest())
            tag = _b64(
                hmac.new(signing, f"imagecb-tag.{kid}.{payload}.{grant}".encode(), "sha256").digest()[:16]
            )
            minted.append(f"{kid}.{payload}.{grant}.{tag}")
    return minted


# ------------------------------------------------------------------ 1. forged tokens are free
def test_forged_tokens_cost_no_connection_lookup_and_leave_nothing_cached(served):
    genuine = _token(asset_callback_url(served.settings, "studio"))
    remote_task_id = _unique("forged")
    with httpx.Client(trust_env=False, timeout=30) as http:
        answers = {
            (answer.status_code, answer.text)
            for answer in (
                http.post(
                    f"{served.callbacks_url}/{_with_connection(genuine, f'made_up_{i}')}",
                    content=callback_body(remote_task_id),
                    headers={"Content-Type": "application/json"},
                )
                for i in range(500)
            )
        }
    assert served.connections.lookups == []
    assert len(served.connections._entries) == 0
    assert len(answers) == 1
    assert _answer(_post(served, _with_connection(genuine, "made_up_0"), b"{}")) == REFUSED
    assert stored_rows(remote_task_id) == []


def test_the_connection_cache_is_bounded_and_drops_the_least_recently_used(monkeypatch):
    loaded: list[str] = []

    def load(conn_id):
        loaded.append(conn_id)
        return None if conn_id.startswith("gone") else object()

    cache = ConnectionCache()
    monkeypatch.setattr(cache, "_load", load)
    for i in range(1000):
        with pytest.raises(ReceiverError) as refused:
            cache.get(f"gone_{i}")
        assert (refused.value.status_code, refused.value.detail) == (403, "callback token is not valid")
    assert len(cache._entries) == cache.max_size == 256

    small = ConnectionCache(max_size=3)
    monkeypatch.setattr(small, "_load", load)
    for conn_id in ("a", "b", "c", "a", "d"):  # "a" used again: "b" is the least recently used
        small.get(conn_id)
    assert list(small._entries) == ["c", "a", "d"]
    loaded.clear()
    small.get("a")
    small.get("b")
    assert loaded == ["b"]


def test_an_authentic_token_for_a_deleted_connection_costs_one_lookup(served):
    gone = dataclasses.replace(served.settings, conn_id="imagecb_deleted")
    url = asset_callback_url(gone, "studio")
    for _ in range(3):
        assert _answer(_post(served, _token(url), callback_body(_unique("gone")))) == REFUSED
    assert served.connections.lookups == ["imagecb_deleted"]


# ------------------------------------------------------------------ 2. keys of our own; one 403
def test_every_refusal_of_a_token_is_the_same_403(served, monkeypatch):
    genuine = _token(asset_callback_url(served.settings, "studio"))
    revoked = _token(asset_callback_url(served.settings, "revoked-label"))
    expired = _token(asset_callback_url(served.settings, "studio", expires_in=1, now=time.time() - 60))
    monkeypatch.setenv("AIRFLOW__IMAGECB__REVOKED_ASSET_LABELS", "revoked-label, another")
    cases = {
        "garbage": "not-a-token",
        "too many parts": "a.b.c.d.e",
        "tag changed": genuine[:-2] + ("AA" if not genuine.endswith("AA") else "BB"),
        "connection changed": _with_connection(genuine, "imagecb_signed"),
        "unknown connection": _token(
            asset_callback_url(dataclasses.replace(served.settings, conn_id="no_such_conn"), "studio")
        ),
        "wrong purpose": watch_token(served.settings),
        "revoked label": revoked,
        "expired and changed": expired[:-2] + ("AA" if not expired.endswith("AA") else "BB"),
        **{
            f"minted with the API key {i}": t
            for i, t in enumerate(_minted_with_the_api_key("imagecb_default", "studio"))
        },
    }
    remote_task_id = _unique("refused")
    answers = {name: _post(served, token, callback_body(remote_task_id)) for name, token in cases.items()}
    different = {name: _answer(a) for name, a in answers.items() if _answer(a) != REFUSED}
    assert different == {}
    assert len({a.content for a in answers.values()}) == 1
    assert stored_rows(remote_task_id) == []


def test_the_vendors_api_key_alone_mints_no_valid_token(served):
    remote_task_id = _unique("vendor")
    for token in _minted_with_the_api_key("imagecb_default", "studio"):
        assert _answer(_post(served, token, callback_body(remote_task_id))) == REFUSED
    assert stored_rows(remote_task_id) == []
    # and the keys do not change with the API key: a new API key revokes nothing and mints nothing
    from imagecb_provider.callbacks.tokens import TokenKeyring

    assert TokenKeyring.from_config() == keyring()


def test_keys_rotate_with_two_valid_at_once(served, monkeypatch):
    old, new = "old:" + "o" * 40, "new:" + "n" * 40
    monkeypatch.setenv("AIRFLOW__IMAGECB__CALLBACK_SIGNING_KEYS", old)
    by_old = _token(asset_callback_url(served.settings, "studio"))
    monkeypatch.setenv("AIRFLOW__IMAGECB__CALLBACK_SIGNING_KEYS", f"{new},{old}")
    by_new = _token(asset_callback_url(served.settings, "studio"))
    assert (by_old.split(".")[0], by_new.split(".")[0]) == ("old", "new")
    # both configured: both verify
    assert _answer(_post(served, by_old, callback_body(_unique("rot1")))) == (200, {"status": "recorded"})
    assert _answer(_post(served, by_new, callback_body(_unique("rot2")))) == (200, {"status": "recorded"})
    # the old key dropped: what it signed is refused like any forgery
    monkeypatch.setenv("AIRFLOW__IMAGECB__CALLBACK_SIGNING_KEYS", new)
    late = _unique("rot3")
    assert _answer(_post(served, by_old, callback_body(late))) == REFUSED
    assert stored_rows(late) == []
    assert _answer(_post(served, by_new, callback_body(_unique("rot4"))))[0] == 200


def test_a_revoked_asset_label_is_refused_and_no_longer_minted(served, monkeypatch):
    url = asset_callback_url(served.settings, "leaked")
    kept = asset_callback_url(served.settings, "kept")
    monkeypatch.setenv("AIRFLOW__IMAGECB__REVOKED_ASSET_LABELS", "leaked")
    remote_task_id = _unique("leaked")
    assert _answer(_post(served, _token(url), callback_body(remote_task_id))) == REFUSED
    assert stored_rows(remote_task_id) == []
    assert _post(served, _token(kept), callback_body(_unique("kept"))).status_code == 200
    with pytest.raises(ValueError, match="revoked"):
        asset_callback_url(served.settings, "leaked")


# ------------------------------------------------------------------ 3. never a 500
def _deep(depth: int, remote_task_id: str) -> bytes:
    inner = "[" * depth + "]" * depth
    return f'{{"code":200,"data":{{"taskId":"{remote_task_id}","info":{{"x":{inner}}}}}}}'.encode()


def test_no_body_makes_the_receiver_fail(served):
    def envelope(remote_task_id: str, code: str = "200", msg: str = '"ok"', info: str = "{}") -> bytes:
        return f'{{"code":{code},"msg":{msg},"data":{{"taskId":"{remote_task_id}","info":{info}}}}}'.encode()

    cases = {
        "deep array": (lambda _: b"[" * 20_000, 400),
        "deep object": (lambda _: b'{"a":' * 10_000 + b"1" + b"}" * 10_000, 400),
        "deep inside a callback": (lambda rid: _deep(60, rid), 400),
        "not UTF-8": (lambda rid: b'{"data":{"taskId":"' + rid.encode() + b'\xff\xfe"}}', 400),
        "NaN": (lambda rid: envelope(rid, code="NaN"), 400),
        "Infinity": (lambda rid: envelope(rid, code="-Infinity"), 400),
        "a float code past every int": (lambda rid: envelope(rid, code="1e400"), 422),
        "a 30-digit code": (lambda rid: envelope(rid, code="1" + "0" * 30), 422),
        "a 5000-digit number": (lambda rid: envelope(rid, code="9" * 5000), 400),
        "info not an object": (lambda rid: envelope(rid, info='"x"'), 422),
        "info a list": (lambda rid: envelope(rid, info="[1]"), 422),
        "an unpaired surrogate": (lambda rid: envelope(rid, msg='"\\ud800"'), 400),
        "a NUL": (lambda rid: envelope(rid, msg='"a\\u0000b"'), 400),
        "null": (lambda _: b"null", 400),
        "empty": (lambda _: b"", 400),
    }
    token = _token(asset_callback_url(served.settings, "studio"))
    wrong = {}
    for name, (make, status) in cases.items():
        remote_task_id = _unique("body")
        answer = _post(served, token, make(remote_task_id))
        if answer.status_code != status or stored_rows(remote_task_id):
            wrong[name] = answer.status_code
    assert wrong == {}


def test_no_header_makes_the_receiver_fail(served):
    """Unix seconds are ASCII digits: "²" (latin-1 0xB2) once reached int() and answered 500."""
    token = _token(callback_url(served.signed, dag_id="d", run_id="r", task_id="t"))
    wrong = {}
    for stamp in (
        b"\xb2",
        b"\xb9\xb2\xb3",
        "١٢٣".encode(),
        b"-5",
        b"1.5",
        b"1e9",
        b"+1700000000",
        b"0x10",
        b"1 2",
    ):
        remote_task_id = _unique("stamp")
        headers = {
            TIMESTAMP_HEADER: stamp,
            SIGNATURE_HEADER: webhook_signature(WEBHOOK_KEY, remote_task_id, "1"),
        }
        answer = _post(served, token, callback_body(remote_task_id), headers)
        if answer.status_code != 401 or stored_rows(remote_task_id):
            wrong[stamp] = answer.status_code
    for length in (b"\xb2", b"-1", b"1.0", b"0x10", b"9" * 40, b"\xb9\xb2"):
        answer = _in_process(served, token, b"{}", [(b"content-length", length)])
        if answer.status_code not in (400, 413):
            wrong[b"Content-Length " + length] = answer.status_code
    remote_task_id = _unique("twice")
    stamp = str(int(time.time()))
    twice = [
        ("Content-Type", "text/plain"),
        (TIMESTAMP_HEADER, stamp),
        (TIMESTAMP_HEADER, b"\xb2"),
        (SIGNATURE_HEADER, webhook_signature(WEBHOOK_KEY, remote_task_id, stamp)),
        (SIGNATURE_HEADER, "x"),
    ]
    answer = _post(served, token, callback_body(remote_task_id), twice)
    if not 200 <= answer.status_code < 500:
        wrong["duplicate headers"] = answer.status_code
    assert wrong == {}


# ------------------------------------------------------------------ 5. one task id form
HOSTILE_IDS = [
    "../../../../tmp/x/pwned",
    "..",
    "a/b",
    "a\\b",
    "a b",
    "id\n",
    "x" * 129,
    "täsk",
    "a.b",
    "%2e%2e",
    "\x00",
    12345,
    True,
    ["task1"],
    {"id": "task1"},
]


@pytest.mark.parametrize("key", ["taskId", "task_id"])
def test_a_remote_task_id_of_another_form_is_refused_400(served, key):
    token = _token(asset_callback_url(served.settings, "studio"))
    wrong = {}
    for value in HOSTILE_IDS:
        body = json.dumps({"code": 200, "data": {key: value, "info": {}}}).encode()
        answer = _post(served, token, body)
        detail = answer.json().get("detail", "") if answer.status_code == 400 else ""
        # a NUL is refused for the body as a whole, before the task id is read
        if not (f"data.{key} is not a task id" in detail or (value == "\x00" and "NUL" in detail)):
            wrong[repr(value)] = (answer.status_code, answer.text)
        elif isinstance(value, str) and stored_rows(value):
            wrong[repr(value)] = "recorded"
    assert wrong == {}
