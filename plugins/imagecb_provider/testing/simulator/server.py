"""
Running the simulator: in a thread of the current process, or as a child process.

Both hand back the same :class:`RunningSimulator`, which steers the server only through its
``/_sim`` endpoints. Going through HTTP even in-process keeps every change on the server's own
event loop (its state has no locks) and makes a test work unchanged against either mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn

from imagecb_provider.testing.simulator.app import create_app
from imagecb_provider.testing.simulator.config import SimulatorConfig

#: JSON of config fields a child process starts from (how run_in_subprocess passes its config).
CONFIG_ENV = "IMAGECB_SIM_CONFIG"
PLUGINS_DIR = Path(__file__).resolve().parents[3]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class RunningSimulator:
    """A live simulator: its base ``url``, its ``config``, and the ``/_sim`` controls."""

    def __init__(self, url: str, config: SimulatorConfig, *, shares_config: bool) -> None:
        self.url = url
        self.config = config
        self._shares_config = shares_config

    def __repr__(self) -> str:
        return f"RunningSimulator(url={self.url!r})"

    def stats(self, *, tasks: bool = True) -> dict[str, Any]:
        """``GET /_sim/stats`` (counters, credits, held tasks, ...); ``tasks=False`` omits the task map."""
        return self._call("GET", "/_sim/stats" if tasks else "/_sim/stats?tasks=0")

    def configure(self, **fields: Any) -> dict[str, Any]:
        """Change config fields of the running server; returns the new config (keys redacted)."""
        result = self._call("POST", "/_sim/config", fields)
        if not self._shares_config:
            self.config.update(**fields)
        return result

    def reset(self) -> None:
        """Forget tasks, counters, rate windows and injections; refill the credits."""
        self._call("POST", "/_sim/reset", {})

    def inject(
        self,
        endpoint: str = "*",
        code: int | None = None,
        *,
        times: int = 1,
        retry_after: float | None = None,
        msg: str | None = None,
        http_status: bool | None = None,
        drop: bool = False,
        echo: bool = False,
    ) -> None:
        """
        Force the answer of the next ``times`` calls to ``endpoint`` (see ``POST /_sim/inject``).

        ``echo`` appends the request as received (headers, ``Authorization`` included, and body) to
        the answer's ``msg``, for tests proving that a client masks secrets in what it reports.
        """
        body = {"endpoint": endpoint, "code": code, "times": times, "retry_after": retry_after}
        body |= {"msg": msg, "http_status": http_status, "drop": drop, "echo": echo or None}
        self._call("POST", "/_sim/inject", {k: v for k, v in body.items() if v is not None})

    def forget(self, task_id: str) -> None:
        """
        Forget a task as the vendor does once its record expires (``POST /_sim/forget``).

        Its record-info then answers in the ``unknown_record`` form; an unknown id raises ``ValueError``.

        :param task_id: the task to forget.
        """
        self._call("POST", "/_sim/forget", {"task_id": task_id})

    def release(
        self, task_id: str | None = None, *, prompt: str | None = None, all_held: bool = False
    ) -> list[str]:
        """
        Let held (``[sim:hold]``) tasks finish: one by id, all with this exact prompt, or all of them.

        Give exactly one of the three. Returns the released task ids; a ``task_id`` or ``prompt``
        that matches no held task raises ``ValueError`` (so a test cannot release too early unseen).
        """
        body: dict[str, Any] = {}
        if task_id is not None:
            body["task_id"] = task_id
        if prompt is not None:
            body["prompt"] = prompt
        if all_held:
            body["all"] = True
        return self._call("POST", "/_sim/release", body)["released"]

    def release_callbacks(
        self, task_id: str | None = None, *, prompt: str | None = None, all_held: bool = False
    ) -> list[str]:
        """
        Send callbacks held by ``hold_callbacks``: one task's, those of this exact prompt, or all.

        Give exactly one of the three. A callback is held only once due (its task completed), so
        a ``task_id`` or ``prompt`` that matches no held callback raises ``ValueError``: wait for
        the id in ``stats()["callbacks_held"]`` first.

        :param task_id: the task whose callback to send.
        :param prompt: send the held callbacks of every task with exactly this prompt.
        :param all_held: send every held callback.
        :return: the task ids whose callbacks were sent.
        """
        body: dict[str, Any] = {"task_id": task_id, "prompt": prompt, "all": all_held or None}
        body = {k: v for k, v in body.items() if v is not None}
        return self._call("POST", "/_sim/callbacks/release", body)["released"]

    def connection_json(self, conn_type: str = "imagecb") -> str:
        """The ``AIRFLOW_CONN_<ID>`` value that points Airflow at this simulator."""
        return json.dumps({"conn_type": conn_type, "host": self.url, "password": self.config.api_key})

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with _NO_PROXY.open(request, timeout=30) as answer:
                return json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            raise ValueError(f"simulator refused {method} {path}: {detail}") from None


class SimulatorServer(uvicorn.Server):
    """uvicorn's server that sends held submission answers at once when it stops, not after 2 s."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Send the held answers, then shut down as uvicorn does."""
        held_answers = getattr(getattr(self.config.app, "state", None), "held_answers", None)
        if held_answers is not None:
            held_answers.close()
        await super().shutdown(sockets)


class _ThreadServer(SimulatorServer):
    """uvicorn's server, woken at once by :meth:`stop` instead of at its next 0.1 s tick."""

    _loop: asyncio.AbstractEventLoop | None = None
    _wake: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)

    def stop(self) -> None:
        """Ask the server to exit; safe from any thread."""
        self.should_exit = True
        if self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                self._loop.call_soon_threadsafe(self._wake.set)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, so port 0 is resolved before the server starts and can be reported."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def base_url(host: str, port: int) -> str:
    """The URL a local client uses: wildcard hosts become loopback, IPv6 gets brackets."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _config(config: SimulatorConfig | None, fields: dict[str, Any]) -> SimulatorConfig:
    if config is None:
        return SimulatorConfig().update(**fields)
    return config.copy(**fields) if fields else config


def _wait_healthy(url: str, alive: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the simulator at {url} stopped before it answered")
        try:
            with _NO_PROXY.open(url + "/_sim/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"the simulator at {url} did not answer /_sim/health within {timeout:g} s")


@contextmanager
def run_in_thread(
    config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0, **fields: Any
) -> Iterator[RunningSimulator]:
    """
    Serve the simulator from a daemon thread of this process until the block ends.

    ``fields`` override ``config`` fields (on a copy). Port 0 picks a free port. The handle's
    ``config`` is the server's live config object. No signal handlers are installed (uvicorn
    skips them outside the main thread).
    """
    config = _config(config, fields)
    sock = bind_socket(host, port)
    server = _ThreadServer(
        uvicorn.Config(
            create_app(config),
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=2,
        )
    )
    url = base_url(host, sock.getsockname()[1])
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"imagecb-sim {url}")
    thread.daemon = True
    thread.start()
    try:
        _wait_healthy(url, thread.is_alive)
        yield RunningSimulator(url, config, shares_config=True)
    finally:
        server.stop()
        thread.join(timeout=10)
        sock.close()


@contextmanager
def run_in_subprocess(
    config: SimulatorConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    startup_timeout: float = 30.0,
    **fields: Any,
) -> Iterator[RunningSimulator]:
    """
    Serve the simulator from ``python -m imagecb_provider.testing.simulator`` until the block ends.

    For callers whose own process must not host it (benchmarks measuring memory, tests of the
    CLI). The config travels in the child's environment (``IMAGECB_SIM_CONFIG``), never on its
    command line, so keys do not show in process listings.
    """
    config = _config(config, fields)
    env = dict(os.environ)
    env[CONFIG_ENV] = json.dumps(config.to_dict(redact=False))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGINS_DIR), env.get("PYTHONPATH")) if p)
    command = [
        sys.executable,
        "-m",
        "imagecb_provider.testing.simulator",
        "--host",
        host,
        "--port",
        str(port),
    ]
    command += ["--log-level", "warning"]
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    try:
        url = _announced_url(child, startup_timeout)
        _wait_healthy(url, lambda: child.poll() is None, startup_timeout)
        yield RunningSimulator(url, config, shares_config=False)
    finally:
        _stop(child)


def _announced_url(child: subprocess.Popen[str], timeout: float) -> str:
    """The URL from the child's one stdout line; stdout keeps being drained so it never blocks."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in child.stdout or ():
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name="imagecb-sim stdout", daemon=True).start()
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if line is None:
            raise RuntimeError(f"the simulator process exited early (code {child.wait()})")
        found = re.search(r"https?://\S+", line)
        if found:
            return found.group(0).rstrip(".,")
    raise TimeoutError(f"the simulator process did not report its URL within {timeout:g} s")


def _stop(child: subprocess.Popen[str]) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
