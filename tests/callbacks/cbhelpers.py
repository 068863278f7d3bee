"""Helpers shared by the callback tests (plain functions; the fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

#: ``[imagecb] callback_signing_keys`` of the callback tests (conftest.py puts it in the environment,
#: which the receivers and commands started by the tests inherit).
SIGNING_KEYS = "t1:imagecb-test-signing-secret-number-one-0123456789"
#: Keys no process of the tests is configured with: a token they sign is forged.
OTHER_SIGNING_KEYS = "t9:imagecb-test-signing-secret-not-configured-anywhere"


def keyring(spec: str = SIGNING_KEYS, **kwargs: Any) -> Any:
    """A :class:`~imagecb_provider.callbacks.tokens.TokenKeyring` of ``kid:secret,...``."""
    from imagecb_provider.callbacks.tokens import TokenKeyring

    return TokenKeyring.from_secrets(spec, **kwargs)


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
    """
    ``python -m imagecb_provider.callbacks`` in a child process; stoppable and restartable on its port.

    :param env: the child's environment.
    :param port: the port (0: a free one, kept across restarts).
    :param log_level: uvicorn's; at ``info`` its access log is on, and what the child printed
        (stdout, and stderr unless ``warning``) is in :attr:`output` once stopped.
    """

    def __init__(self, env: dict[str, str], port: int = 0, log_level: str = "warning") -> None:
        self.env = env
        self.port = port
        self.log_level = log_level
        self.process: Any = None
        self.url = ""
        self.output = ""

    def start(self) -> StandaloneReceiver:
        import re
        import subprocess
        import sys

        import httpx

        command = [sys.executable, "-m", "imagecb_provider.callbacks", "--port", str(self.port)]
        command += ["--log-level", self.log_level]
        # stderr joins stdout only when the log is wanted: nothing else reads the pipe meanwhile
        stderr = None if self.log_level == "warning" else subprocess.STDOUT
        self.process = subprocess.Popen(
            command, env=self.env, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
        found = None
        while not found:  # the announcement, after whatever the child logged while starting
            line = self.process.stdout.readline()
            self.output += line
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if not line:
                self.stop()
                raise RuntimeError(f"the standalone receiver did not announce its URL: {self.output!r}")
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
        if self.process is not None:
            self.output += self.process.stdout.read()
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


# ------------------------------------------------------------------------- hostile requests
def token_shapes(token: str) -> list[tuple[str, str]]:
    """
    (method, request target) pairs that carry ``token`` in every way a path can: each method on the
    callback URL, trailing, doubled and percent-encoded slashes, dot segments, a query, a longer
    path, another path of the app.
    """
    url = f"/imagecb/callbacks/{token}"
    return [
        *((method, url) for method in ("GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "POST")),
        ("POST", f"{url}/"),
        ("GET", f"{url}/"),
        ("POST", f"{url}//"),
        ("POST", f"/imagecb/callbacks//{token}"),
        ("POST", f"/imagecb//callbacks/{token}"),
        ("POST", f"{url}%2F"),
        ("POST", f"/imagecb/callbacks%2F{token}"),
        ("POST", f"/imagecb/callbacks/{token.replace('.', '%2E')}"),
        ("GET", f"{url}?after=1"),
        ("POST", f"{url}/extra"),
        ("DELETE", f"{url}/"),
        ("POST", f"/imagecb/./callbacks/{token}"),
        ("POST", f"/imagecb/callbacks/x/../{token}"),
        ("GET", f"/imagecb/elsewhere/{token}"),
    ]


def outside_the_mount(token: str) -> list[tuple[str, str]]:
    """Shapes of a callback URL the API server does not route to ``/imagecb``."""
    return [
        ("POST", f"//imagecb/callbacks/{token}"),
        ("POST", f"/x/../imagecb/callbacks/{token}"),
        ("GET", f"/api/v2/{token}"),
    ]


def raw_request(
    base_url: str, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, list[tuple[str, str]]]:
    """
    Send one HTTP/1.1 request exactly as written (no client normalizes the target); return the
    status and the response headers.
    """
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {url.netloc}", "Connection: close"]
    lines += [
        f"{name}: {value}" for name, value in {"Content-Type": "application/json", **(headers or {})}.items()
    ]
    lines.append(f"Content-Length: {len(body)}")
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    pairs = [line.split(":", 1) for line in head[1:] if ":" in line]
    return int(head[0].split()[1]), [(name.strip().lower(), value.strip()) for name, value in pairs]


def callback_body(remote_task_id: str) -> bytes:
    """A successful callback body for ``remote_task_id``, as the vendor posts it."""
    import json

    data = {
        "code": 200,
        "msg": "success",
        "data": {"taskId": remote_task_id, "info": {"resultImageUrl": "x"}},
    }
    return json.dumps(data).encode()


#: The local PostgreSQL (127.0.0.1:5432, user ``postgres``, trust) the store and migrate tests use.
POSTGRES_SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432"


@contextlib.contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """
    Create an empty database on the local PostgreSQL; yield its URL; drop it after.

    :param prefix: the start of the database's name (a random suffix follows).
    """
    import pytest
    import sqlalchemy as sa

    admin = sa.create_engine(
        f"{POSTGRES_SERVER}/postgres", isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
    )
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as error:
        pytest.fail(
            f"PostgreSQL does not answer on 127.0.0.1:5432 as user postgres (trust): {error.orig}",
            pytrace=False,
        )
    try:
        yield f"{POSTGRES_SERVER}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(
                sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                {"name": name},
            )
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
