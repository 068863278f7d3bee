"""
The receiver mounted in Airflow's own API server application, the way the provider's plugin mounts
it (``fastapi_apps`` with ``url_prefix="/imagecb"``): Airflow adds no authentication to it, its
access log shows the path without the token (whatever the method and the shape of the path), and
callbacks are recorded.
"""

from __future__ import annotations

import json

import httpx
import pytest
from cbhelpers import ServerThread, attempts, stored_rows, submit, wait_until

from imagecb_provider.callbacks.app import RedactCallbackTokens, create_app
from imagecb_provider.callbacks.receiver import CallbackReceiver
from imagecb_provider.callbacks.tokens import callback_url, watch_token

pytestmark = [pytest.mark.timeout(120), pytest.mark.airflow]


@pytest.fixture
def api_server(callback_db, monkeypatch):
    """Airflow's API server app (core APIs) with the receiver as a plugin app, over real HTTP."""
    server = _api_server(monkeypatch, [])
    yield server
    server.stop()


def test_a_callback_through_the_airflow_api_server(api_server, imagecb_simulator_factory, connect, capfd):
    simulator = imagecb_simulator_factory(latency=0.3, webhook_hmac_key="api-whk")
    settings = connect(simulator, api_server.url, webhook_hmac_key="api-whk")
    url = callback_url(settings, dag_id="api_dag", run_id="api_run", task_id="t")
    remote_task_id = submit("through the api server", url)
    wait_until(lambda: attempts(simulator, remote_task_id), what="the delivery")
    assert attempts(simulator, remote_task_id)[0]["status"] == 200
    assert stored_rows(remote_task_id)[0]["signed"] is True

    auth = {"Authorization": f"Bearer {watch_token(settings)}"}
    found = httpx.post(
        f"{api_server.url}/imagecb/callbacks/lookup",
        json={"remote_task_ids": [remote_task_id]},
        headers=auth,
        trust_env=False,
    ).json()
    assert [i["remote_task_id"] for i in found["items"]] == [remote_task_id]
    assert httpx.get(f"{api_server.url}/imagecb/callbacks/events", trust_env=False).status_code == 401

    out, err = capfd.readouterr()
    assert url.rsplit("/", 1)[1] not in out + err


def _api_server(monkeypatch, root_middlewares: list) -> ServerThread:
    from airflow import plugins_manager
    from airflow.api_fastapi import app as airflow_app

    plugin_app = {
        "app": create_app(CallbackReceiver()),
        "url_prefix": "/imagecb",
        "name": "imagecb callbacks",
    }
    monkeypatch.setattr(plugins_manager, "get_fastapi_plugins", lambda: ([plugin_app], root_middlewares))
    return ServerThread(airflow_app.create_app(apps="core")).start()


ROOT_MIDDLEWARE = {
    "name": "imagecb tokens",
    "middleware": RedactCallbackTokens,
    "kwargs": {"prefix": "/imagecb"},
}


@pytest.mark.parametrize("root", [False, True], ids=["plugin app", "plugin app and root middleware"])
def test_no_shape_of_path_puts_the_token_in_the_api_servers_access_log(callback_db, monkeypatch, capfd, root):
    """
    Every shape that reaches the plugin's app; with the middleware in front of the whole API server
    too (``fastapi_root_middlewares``), also those that never reach it (``//imagecb/...``).
    """
    server = _api_server(monkeypatch, [ROOT_MIDDLEWARE] if root else [])
    try:
        _check_every_shape(server, monkeypatch, capfd, root)
    finally:
        server.stop()


def _check_every_shape(api_server, monkeypatch, capfd, root: bool) -> None:
    from cbhelpers import callback_body, outside_the_mount, raw_request, token_shapes

    from imagecb_provider.callbacks.tokens import asset_callback_url
    from imagecb_provider.hooks.imagecb import ImageCbConnectionSettings

    conn = {"conn_type": "imagecb", "password": "api-key", "extra": {"callback_base_url": api_server.url}}
    monkeypatch.setenv("AIRFLOW_CONN_IMAGECB_DEFAULT", json.dumps(conn))
    settings = ImageCbConnectionSettings(
        conn_id="imagecb_default", base_url="http://sim", api_key="api-key", callback_base_url=api_server.url
    )
    token = asset_callback_url(settings, "api-logs").rsplit("/", 1)[1]
    grant = token.split(".")[2]
    shapes = token_shapes(token) + (outside_the_mount(token) if root else [])
    answers = {
        (method, target): raw_request(api_server.url, method, target, callback_body(f"api-shape-{i}"))
        for i, (method, target) in enumerate(shapes)
    }
    logged = []

    def every_request_logged() -> bool:  # each line is written once its answer went out
        logged.extend(capfd.readouterr())
        return "".join(logged).count("request finished") >= len(answers)

    wait_until(every_request_logged, what="an access log line per request")
    assert token not in "".join(logged)
    assert grant not in "".join(logged)
    assert "path=/imagecb/callbacks/***" in "".join(logged)
    for (method, target), (status, headers) in answers.items():
        assert status != 307, f"{method} {target}"
        assert all(grant not in value for _, value in headers), f"{method} {target}"
    assert answers[("POST", f"/imagecb/callbacks/{token}/")][0] == 200
