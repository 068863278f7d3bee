"""
Fixtures for the callback receiver tests: the provider's tables, a receiver served over real
HTTP the way the Airflow API server mounts it, and the connection that points the simulator's
callbacks at it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from cbhelpers import SIGNING_KEYS, ServerThread

CONN_ENV = "AIRFLOW_CONN_IMAGECB_DEFAULT"
# Callback tokens are signed with keys of the provider's own; the tests' throwaway AIRFLOW_HOME
# has no [core] fernet_key to derive them from. Set before anything mints a token; the receivers
# and commands the tests start inherit it.
os.environ["AIRFLOW__IMAGECB__CALLBACK_SIGNING_KEYS"] = SIGNING_KEYS


@pytest.fixture(scope="session")
def callback_db(airflow_db):
    """Airflow's test database with the provider's tables, created by the provider's db-manager."""
    from airflow.utils.session import create_session

    from imagecb_provider.callbacks.db import CallbackDBManager

    with create_session() as session:
        CallbackDBManager(session).initdb()
    return True


# ------------------------------------------------------------------------------ serving
class RequestLog:
    """ASGI middleware recording (method, path as seen after the response, client port) per request."""

    def __init__(self, app: Any, entries: list[tuple[str, str, int]]) -> None:
        self.app = app
        self.entries = entries

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                client = scope.get("client") or ("", 0)
                self.entries.append((scope["method"], scope["path"], client[1]))


@dataclass
class Receiver:
    """A receiver served like the plugin on the API server: an app mounted at ``/imagecb``."""

    receiver: Any
    server: ServerThread
    requests: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """What ``callback_base_url`` is set to (the API server's public URL)."""
        return self.server.url

    @property
    def callbacks_url(self) -> str:
        return f"{self.server.url}/imagecb/callbacks"

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.start()


def plugin_style_app(receiver: Any, requests: list[tuple[str, str, int]]) -> Any:
    """A parent app with Airflow's access log middleware and the receiver mounted like a plugin app."""
    from airflow.api_fastapi.common.http_access_log import HttpAccessLogMiddleware
    from fastapi import FastAPI

    from imagecb_provider.callbacks.app import create_app

    parent = FastAPI()
    parent.mount("/imagecb", create_app(receiver))
    parent.add_middleware(HttpAccessLogMiddleware)
    return RequestLog(parent, requests)


@pytest.fixture
def start_receiver(callback_db) -> Iterator[Callable[..., Receiver]]:
    """``start_receiver(**CallbackReceiver kwargs)`` serves a fresh receiver; all stop after the test."""
    from imagecb_provider.callbacks.receiver import CallbackReceiver

    started: list[Receiver] = []

    def start(port: int = 0, **kwargs: Any) -> Receiver:
        kwargs.setdefault("poll_interval", 0.05)
        requests: list[tuple[str, str, int]] = []
        receiver = CallbackReceiver(**kwargs)
        handle = Receiver(
            receiver, ServerThread(plugin_style_app(receiver, requests), port).start(), requests
        )
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


@pytest.fixture
def receiver(start_receiver) -> Receiver:
    return start_receiver()


@pytest.fixture
def connect(monkeypatch) -> Callable[..., Any]:
    """
    ``connect(simulator, receiver_url, **extras)``: point ``imagecb_default`` at the simulator with
    ``callback_base_url`` (and any other extras); return its settings.
    """

    def point(simulator: Any, callback_base_url: str | None, **extras: Any) -> Any:
        from imagecb_provider.hooks.imagecb import ImageCbHook

        conn = json.loads(simulator.connection_json())
        conn["extra"] = {k: v for k, v in {"callback_base_url": callback_base_url, **extras}.items() if v}
        monkeypatch.setenv(CONN_ENV, json.dumps(conn))
        return ImageCbHook().settings

    return point
