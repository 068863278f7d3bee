"""
The receiver mounted in Airflow's own API server application, the way the provider's plugin mounts
it (``fastapi_apps`` with ``url_prefix="/imagecb"``): Airflow adds no authentication to it, its
access log shows the path without the token, and callbacks are recorded.
"""

from __future__ import annotations

import httpx
import pytest
from cbhelpers import ServerThread, attempts, stored_rows, submit, wait_until

from imagecb_provider.callbacks.app import create_app
from imagecb_provider.callbacks.receiver import CallbackReceiver
from imagecb_provider.callbacks.tokens import callback_url, watch_token

pytestmark = [pytest.mark.timeout(120), pytest.mark.airflow]


@pytest.fixture
def api_server(callback_db, monkeypatch):
    """Airflow's API server app (core APIs) with the receiver as a plugin app, over real HTTP."""
    from airflow import plugins_manager
    from airflow.api_fastapi import app as airflow_app

    plugin_app = {
        "app": create_app(CallbackReceiver()),
        "url_prefix": "/imagecb",
        "name": "imagecb callbacks",
    }
    monkeypatch.setattr(plugins_manager, "get_fastapi_plugins", lambda: ([plugin_app], []))
    server = ServerThread(airflow_app.create_app(apps="core")).start()
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
