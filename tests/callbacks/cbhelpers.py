"""Helpers shared by the callback tests (plain functions; the fixtures are in conftest.py)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "the condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def stored_rows(remote_task_id: str) -> list[dict[str, Any]]:
    """Every row recorded for a remote task id, whatever its connection."""
    import sqlalchemy as sa

    from imagecb_provider.callbacks.schema import callback_table
    from imagecb_provider.callbacks.store import CallbackStore

    with CallbackStore().engine.connect() as conn:
        query = sa.select(callback_table).where(callback_table.c.remote_task_id == remote_task_id)
        return [dict(row._mapping) for row in conn.execute(query)]


def attempts(simulator: Any, remote_task_id: str) -> list[dict[str, Any]]:
    """The simulator's delivery attempts of the callback of one task."""
    return [c for c in simulator.stats()["callbacks"] if c["taskId"] == remote_task_id]


def deliver_held(simulator: Any, remote_task_id: str) -> int | None:
    """
    Send a callback the simulator holds (``hold_callbacks``); return the answer to its first attempt.

    Fails unless the callback was due and held, with no attempt made before: whatever the test did
    before calling this (writing the ledger, say) happened before the receiver saw the callback.

    :param simulator: the running simulator, started with ``hold_callbacks=True``.
    :param remote_task_id: the task whose callback to send.
    """
    wait_until(
        lambda: remote_task_id in simulator.stats(tasks=False)["callbacks_held"],
        what=f"the callback of {remote_task_id} to be due and held",
    )
    assert attempts(simulator, remote_task_id) == [], "the callback reached the receiver before its release"
    simulator.release_callbacks(remote_task_id)
    return wait_until(lambda: attempts(simulator, remote_task_id), what="a delivery")[0]["status"]


def post_callback(url: str, remote_task_id: str) -> int:
    """
    POST a successful callback body for ``remote_task_id`` to a callback URL; return the HTTP status.

    :param url: a callback URL (its token is what the receiver checks).
    :param remote_task_id: the task id the body names.
    """
    import httpx

    body = {"code": 200, "msg": "success", "data": {"taskId": remote_task_id, "info": {}}}
    return httpx.post(url, json=body, trust_env=False, timeout=30).status_code


def submit(prompt: str, callback_url: str, conn_id: str = "imagecb_default") -> str:
    """Submit one generation to the simulator through the provider's hook; return its task id."""
    from imagecb_provider.hooks.imagecb import ImageCbHook
    from imagecb_provider.models import GenerationRequest

    return ImageCbHook(imagecb_conn_id=conn_id).submit(
        GenerationRequest(prompt=prompt, callback_url=callback_url)
    )


class StandaloneReceiver:
    """``python -m imagecb_provider.callbacks`` in a child process; stoppable and restartable on its port."""

    def __init__(self, env: dict[str, str], port: int = 0) -> None:
        self.env = env
        self.port = port
        self.process: Any = None
        self.url = ""

    def start(self) -> StandaloneReceiver:
        import re
        import subprocess
        import sys

        import httpx

        command = [sys.executable, "-m", "imagecb_provider.callbacks", "--port", str(self.port)]
        command += ["--log-level", "warning"]
        self.process = subprocess.Popen(command, env=self.env, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not found:
            self.stop()
            raise RuntimeError(f"the standalone receiver did not announce its URL: {line!r}")
        self.port = int(found.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{self.url}/imagecb/callbacks/health", trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, what="the standalone receiver to answer")
        return self

    def stop(self) -> None:
        import subprocess

        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class ServerThread:
    """uvicorn serving an ASGI app from a daemon thread; stoppable and restartable on the same port."""

    def __init__(self, app: Any, port: int = 0) -> None:
        self.app = app
        self.port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        import uvicorn

        sock = socket.create_server(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_config=None, log_level="warning", lifespan="off", timeout_graceful_shutdown=1
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=f"receiver {self.url}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the receiver at {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop like a restarted server: held long-polls are cut after a second."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=15)
            self._server = self._thread = None
