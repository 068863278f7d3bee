"""
No access log shows a callback token, whatever the method and the shape of the path that carries it
(finding 4 of the security review): Airflow's access log middleware in front of the receiver
mounted like the plugin, and uvicorn's access log in front of the standalone receiver. Airflow's
own API server is checked in ``test_airflow_api_server.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cbhelpers import StandaloneReceiver, callback_body, raw_request, token_shapes, wait_until

import imagecb_provider
from imagecb_provider.callbacks.tokens import asset_callback_url
from imagecb_provider.hooks.imagecb import ImageCbConnectionSettings

pytestmark = pytest.mark.timeout(180)


def _settings(base_url: str) -> ImageCbConnectionSettings:
    return ImageCbConnectionSettings(
        conn_id="imagecb_default", base_url="http://sim", api_key="log-key", callback_base_url=base_url
    )


def send_every_shape(base_url: str, token: str) -> dict[tuple[str, str], tuple[int, list]]:
    """Send the token in every shape; return each answer's status and headers."""
    return {
        (method, target): raw_request(base_url, method, target, callback_body(f"shape-{index}"))
        for index, (method, target) in enumerate(token_shapes(token))
    }


def assert_nothing_carries(token: str, answers: dict, *logs: str) -> None:
    """Neither the logs nor any answer's headers hold the token or its grant (its secret part)."""
    grant = token.split(".")[2]
    for log in logs:
        assert token not in log
        assert grant not in log
    for (method, target), (status, headers) in answers.items():
        assert status != 307, f"{method} {target} redirected"
        assert all(grant not in value for _, value in headers), f"{method} {target}: {headers}"
    # served, not turned away: a vendor appending a slash still gets its callback recorded
    assert answers[("POST", f"/imagecb/callbacks/{token}/")][0] == 200
    assert answers[("GET", f"/imagecb/callbacks/{token}")][0] == 405


def test_no_shape_of_path_puts_the_token_in_airflows_access_log(receiver, monkeypatch, capfd):
    conn = {"conn_type": "imagecb", "password": "log-key", "extra": {"callback_base_url": receiver.url}}
    monkeypatch.setenv("AIRFLOW_CONN_IMAGECB_DEFAULT", json.dumps(conn))
    token = asset_callback_url(_settings(receiver.url), "logs").rsplit("/", 1)[1]
    answers = send_every_shape(receiver.url, token)
    shapes = len(token_shapes(token))
    wait_until(lambda: len(receiver.requests) >= shapes, what="every request to be logged")
    out, err = capfd.readouterr()
    logged_paths = "\n".join(path for _, path, _ in receiver.requests)
    assert_nothing_carries(token, answers, out + err, logged_paths)
    assert out.count("request finished") + err.count("request finished") >= shapes
    assert "path=/imagecb/callbacks/***" in out + err


def test_no_shape_of_path_puts_the_token_in_uvicorns_access_log(callback_db):
    code = Path(imagecb_provider.__file__).resolve().parents[1]  # the code under test, in the child too
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(code), env.get("PYTHONPATH")) if p)
    env["AIRFLOW_CONN_IMAGECB_DEFAULT"] = json.dumps({"conn_type": "imagecb", "password": "log-key"})
    standalone = StandaloneReceiver(env, log_level="info").start()
    try:
        token = asset_callback_url(_settings(standalone.url), "logs").rsplit("/", 1)[1]
        answers = send_every_shape(standalone.url, token)
    finally:
        standalone.stop()
    assert_nothing_carries(token, answers, standalone.output)
    assert standalone.output.count('"POST /imagecb/callbacks/%2A%2A%2A HTTP/1.1"') >= 5
    assert standalone.output.count('"GET /imagecb/callbacks/%2A%2A%2A') >= 2


def test_a_segment_that_is_no_token_is_not_scrubbed_from_the_answer(receiver):
    """Scrubbing a stranger's ``1`` out of the answer's headers would break its Content-Length."""
    status, headers = raw_request(receiver.url, "POST", "/imagecb/callbacks/1", b"{}")
    assert status == 403
    assert dict(headers)["content-type"] == "application/json"
    assert dict(headers)["content-length"].isdigit()
