"""
The FastAPI application: the vendor's four API endpoints, the files, and the ``/_sim`` controls.

Every API answer goes through :func:`answer`, which is where the vendor's habit of sending
errors as HTTP 200 (with the real code in the body) is switched to real HTTP statuses, so the
two modes cannot drift apart endpoint by endpoint.

Each endpoint reads the whole request before deciding anything, so a submission is either
refused or accepted (created and charged) in one step of the event loop: whoever reads
``/_sim/stats`` sees either nothing of it or all of it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import pydantic_core
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from imagecb_provider.testing.simulator.callbacks import CallbackSender
from imagecb_provider.testing.simulator.config import SimulatorConfig
from imagecb_provider.testing.simulator.images import CONTENT_TYPES, EXTENSIONS, ImageCache, render
from imagecb_provider.testing.simulator.markers import SUCCESS
from imagecb_provider.testing.simulator.state import ENDPOINTS, Injection, SimState, Task, number
from imagecb_provider.testing.simulator.uploads import check_input_image, register_uploads
from imagecb_provider.testing.simulator.validation import ValidationFailure, validate_submission

GENERATE_PATH = "/api/v1/flux/kontext/generate"
RECORD_INFO_PATH = "/api/v1/flux/kontext/record-info"
CREDIT_PATH = "/api/v1/chat/credit"
DOWNLOAD_URL_PATH = "/api/v1/common/download-url"
RAW_SEND = "imagecb.sim.raw_send"
PARTIAL_JSON = b'{"code": 200, "msg": "succ'
FILE_PATH = re.compile(r"^/files/(?P<task_id>[0-9a-f]{32})/(?P<kind>origin|result)\.(?P<ext>jpg|png)$")

#: How a key's cap refuses a submission. The vendor documents per-key hourly, daily and total caps
#: but not their answer: this text is a guess.
CAP_MESSAGE = "Your API key has reached its usage limit (hourly, daily or total cap set for the key)"
DEFAULT_MESSAGES = {
    200: "success",
    401: "You do not have access permissions: missing or invalid API key",
    402: "Insufficient credits",
    404: "Not found",
    408: "Upstream timeout",
    422: "Validation error",
    429: "Rate limited: too many requests, the request was not queued",
    455: "Service unavailable: under maintenance",
    500: "Server error, please try again later",
    501: "Generation failed",
    505: "Feature disabled",
}


class _SimulatorApp(FastAPI):
    """FastAPI that remembers the server's own ``send``, so a fault can cut the connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[RAW_SEND] = send
        await super().__call__(scope, receive, send)


class DroppedConnection(Response):
    """
    Starts a response, sends part of the body, then closes the socket.

    Headers go out first on purpose: clients such as aiohttp silently resend an idempotent
    request whose connection closed before any answer, which would hide the fault. With a
    ``Content-Length`` promising more than arrives, ``requests`` raises ``ChunkedEncodingError``
    and aiohttp ``ClientPayloadError``: a connection-level failure seen by the caller.
    """

    def __init__(self, partial: bytes = PARTIAL_JSON, kind: bytes = b"application/json") -> None:
        super().__init__(content=b"")
        self.partial = partial
        self.kind = kind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        partial = self.partial
        headers = [(b"content-type", self.kind), (b"content-length", b"%d" % (len(partial) + 512))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": partial, "more_body": True})
        await _close_transport(scope)


async def _close_transport(scope: Scope) -> None:
    """Close the socket under uvicorn; without access, uvicorn closes it itself (and logs)."""
    cycle = getattr(scope.get(RAW_SEND), "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        return
    transport.close()
    for _ in range(200):  # until uvicorn notices, so it does not log an unfinished response
        if getattr(cycle, "disconnected", True):
            return
        await asyncio.sleep(0.005)


class HeldAnswers:
    """
    Holds submission answers back until ``submit_answer_delay`` has passed since their receipt.

    The delay is read from the live config while waiting, so lowering it (to 0, say) sends the
    held answers at once; a client that disconnects ends its wait too, as nobody is left to answer,
    and so does the server's shutdown (:meth:`close`), which would otherwise wait for them.
    """

    def __init__(self, state: SimState) -> None:
        self.state = state
        self.closed = False
        self._wakers: set[asyncio.Future[None]] = set()

    def close(self) -> None:
        """Send every held answer now and hold no more (the server is stopping)."""
        self.closed = True
        self.wake()

    def wake(self) -> None:
        """Make every waiting answer look at the (changed) delay again."""
        for waker in self._wakers:
            if not waker.done():
                waker.set_result(None)

    async def hold(self, request: Request, received: float) -> None:
        """Wait until ``received`` (monotonic) + the delay, or until the client is gone."""
        if self.closed or self.state.config.submit_answer_delay <= 0:
            return
        # The body has been read, so the next message uvicorn delivers is the disconnect.
        gone = asyncio.ensure_future(request.receive())
        try:
            while not gone.done() and not self.closed:
                remaining = received + self.state.config.submit_answer_delay - time.monotonic()
                if remaining <= 0:
                    return
                await self._wait(gone, remaining)
        finally:
            gone.cancel()

    async def _wait(self, gone: asyncio.Future[Any], timeout: float) -> None:
        changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wakers.add(changed)
        try:
            await asyncio.wait({gone, changed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._wakers.discard(changed)


def create_app(config: SimulatorConfig | None = None) -> FastAPI:
    """A new simulator app with its own state; ``app.state.simulator`` is the :class:`SimState`."""
    state = SimState(config if config is not None else SimulatorConfig())
    sender = CallbackSender(state)
    images = ImageCache()
    held_answers = HeldAnswers(state)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await sender.aclose()

    app = _SimulatorApp(title="imagecb API simulator", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.simulator = state
    app.state.callbacks = sender
    app.state.held_answers = held_answers
    api = _Api(state, sender, images, held_answers)
    app.add_api_route(GENERATE_PATH, api.generate, methods=["POST"])
    app.add_api_route(RECORD_INFO_PATH, api.record_info, methods=["GET"])
    app.add_api_route(CREDIT_PATH, api.credit, methods=["GET"])
    app.add_api_route(DOWNLOAD_URL_PATH, api.download_url, methods=["POST"])
    app.add_api_route("/files/{task_id}/{name}", api.file, methods=["GET"])
    register_uploads(app, api)
    _add_controls(app, state, sender, images, held_answers)
    return app


class _Api:
    """The vendor endpoints; one instance per app, holding that app's state."""

    def __init__(
        self, state: SimState, sender: CallbackSender, images: ImageCache, held_answers: HeldAnswers
    ) -> None:
        self.state = state
        self.sender = sender
        self.images = images
        self.held_answers = held_answers

    # ------------------------------------------------------------------ helpers
    def answer(
        self,
        code: int,
        msg: str | None = None,
        data: Any = None,
        *,
        http_status: bool | None = None,
        headers: dict[str, str] | None = None,
    ) -> JSONResponse:
        """The envelope; the HTTP status is the code only in ``http_status_errors`` mode."""
        as_status = self.state.config.http_status_errors if http_status is None else http_status
        status = code if code != 200 and as_status and 100 <= code <= 599 else 200
        body = {
            "code": code,
            "msg": msg if msg is not None else DEFAULT_MESSAGES.get(code, "error"),
            "data": data,
        }
        return JSONResponse(body, status_code=status, headers=headers)

    def reject(self, code: int, msg: str, headers: dict[str, str] | None = None) -> JSONResponse:
        self.state.counters.rejected[code] += 1
        return self.answer(code, msg, headers=headers)

    def forced(self, injection: Injection, request: Request, raw: bytes) -> Response:
        """Answer as injected; with ``echo`` the ``msg`` carries the request as received."""
        self.state.counters.injected["drop" if injection.drop else injection.code] += 1
        if injection.drop:
            return DroppedConnection()
        headers = None
        if injection.retry_after is not None:
            headers = {"Retry-After": _seconds(injection.retry_after)}
        msg = injection.msg
        if injection.echo:
            msg = f"{msg or DEFAULT_MESSAGES.get(injection.code, 'error')} | {_echo(request, raw)}"
        return self.answer(injection.code, msg, http_status=injection.http_status, headers=headers)

    def fault(self, endpoint: str) -> Response | None:
        """Answer with a random fault drawn for ``endpoint`` (see ``fault_endpoints``), or return ``None``."""
        kind = self.state.draw_fault(endpoint)
        if kind is None:
            return None
        if kind == "drop":
            return DroppedConnection()
        return self.answer(int(kind), headers=_fault_headers(kind))

    def guard(self, request: Request, endpoint: str, raw: bytes) -> Response | None:
        """Count the call, then injected answers, random faults, and the API key, in that order."""
        self.state.counters.requests[endpoint] += 1
        injection = self.state.take_injection(endpoint)
        if injection is not None:
            return self.forced(injection, request, raw)
        fault = self.fault(endpoint)
        if fault is not None:
            return fault
        if _bearer(request) != self.state.config.api_key:
            return self.reject(401, DEFAULT_MESSAGES[401] + " (send Authorization: Bearer <api key>)")
        return None

    # ---------------------------------------------------------------- endpoints
    async def generate(self, request: Request) -> Response:
        """
        Submit, then hold the answer ``submit_answer_delay`` seconds (or until the client leaves).

        Everything between the body's arrival and the decision is synchronous, so a task counted
        in ``submissions_in_flight`` has already been created and charged (or refused).
        """
        raw = await request.body()
        received = time.monotonic()
        self.state.submissions_in_flight += 1
        try:
            answer = self.submit(request, raw)
            await self.held_answers.hold(request, received)
            return answer
        finally:
            self.state.submissions_in_flight -= 1

    def submit(self, request: Request, raw: bytes) -> Response:
        """Decide a submission: injections, faults, key, fields, disabled model, rate limit, credits."""
        refused = self.guard(request, "generate", raw)
        if refused is not None:
            return refused
        body = _parse(raw)
        try:
            plan = validate_submission(body)
            check_input_image(self.state, body, str(request.base_url), time.time())
        except ValidationFailure as error:
            return self.reject(error.code, str(error))
        model = body.get("model") or "flux-kontext-pro"
        if model in self.state.config.disabled_models:
            return self.reject(505, f"Feature disabled: model {model} is not available")
        now = time.time()
        key = _bearer(request) or ""
        if self.state.capped(key):
            after = self.state.config.submission_cap_retry_after
            return self.reject(429, CAP_MESSAGE, headers={"Retry-After": _seconds(after)} if after else None)
        wait = self.state.rate_limited(key, now)
        if wait is not None:
            return self.reject(
                429, DEFAULT_MESSAGES[429], headers={"Retry-After": str(max(1, math.ceil(wait)))}
            )
        cost = self.state.cost(model)
        if self.state.credits < cost:
            return self.reject(
                402,
                f"Insufficient credits: {model} costs {number(cost)}, balance is "
                f"{number(self.state.credits)}",
            )
        task = self.state.submit(body, plan, str(request.base_url), now)
        self.state.windows[key].append(now)
        self.state.cap_used[key] = self.state.cap_used.get(key, 0) + 1
        self.sender.schedule(task)
        return self.answer(200, "success", {"taskId": task.task_id})

    async def record_info(self, request: Request) -> Response:
        task_id = request.query_params.get("taskId")
        if task_id:
            self.state.counters.status_calls[task_id] += 1
        refused = self.guard(request, "record-info", await request.body())
        if refused is not None:
            return refused
        if not task_id:
            return self.reject(422, "taskId is required")
        task = self.state.tasks.get(task_id)
        if task is None:
            return self.unknown_record(task_id)
        return self.answer(200, "success", self.state.record(task, str(request.base_url), time.time()))

    def unknown_record(self, task_id: str) -> Response:
        """Answer record-info for a task this simulator does not know, in the configured form."""
        form = self.state.config.unknown_record
        if form == "null":
            return self.answer(200, "success", None)
        if form == "404":
            return self.reject(404, f"Task not found: taskId {task_id!r} does not exist")
        return self.reject(422, "The record does not exist")  # what third-party clients report

    async def credit(self, request: Request) -> Response:
        refused = self.guard(request, "credit", await request.body())
        if refused is not None:
            return refused
        return self.answer(200, "success", number(self.state.credits))

    async def download_url(self, request: Request) -> Response:
        raw = await request.body()
        refused = self.guard(request, "download-url", raw)
        if refused is not None:
            return refused
        body = _parse(raw)
        url = body.get("url") if isinstance(body, dict) else None
        if not isinstance(url, str) or not url:
            return self.reject(422, "url is required and must be a string")
        path = self._own_file(url, request)
        if path is None:
            return self.reject(422, "url was not generated by this service")
        return self.answer(200, "success", self.state.fresh_link(path, str(request.base_url), time.time()))

    def _own_file(self, url: str, request: Request) -> str | None:
        """The file path of ``url`` when it names a finished task's file served here."""
        parts = urlsplit(url)
        match = FILE_PATH.match(parts.path)
        hosts = self.state.issued_hosts | {urlsplit(str(request.base_url)).netloc.lower()}
        if match is None or parts.netloc.lower() not in hosts:
            return None
        task = self._finished(match)
        return parts.path if task is not None else None

    def _finished(self, match: re.Match[str]) -> Task | None:
        task = self.state.tasks.get(match["task_id"])
        if task is None or not task.done(time.time()) or task.outcome is not SUCCESS:
            return None
        return task if EXTENSIONS[task.output_format] == match["ext"] else None

    async def file(self, request: Request, task_id: str, name: str) -> Response:
        """A task's image; origin links expire, signed fresh links last ``download_url_ttl``."""
        fault = self._file_fault()
        if fault is not None:
            return fault
        path = f"/files/{task_id}/{name}"
        match = FILE_PATH.match(path)
        task = self._finished(match) if match else None
        if match is None or task is None:
            return Response("no such file\n", status_code=404, media_type="text/plain")
        refused = self._link_refused(request, task, path, match["kind"])
        if refused is not None:
            return refused
        data = self.images.get(task.task_id)
        if data is None:
            data = await asyncio.to_thread(render, task.prompt, task.aspect_ratio, task.output_format)
            self.images.put(task.task_id, data)
        self.state.counters.downloads[path] += 1
        return Response(data, media_type=CONTENT_TYPES[task.output_format])

    def _file_fault(self) -> Response | None:
        """Answer a download with a random fault: a plain-text HTTP error (no envelope) or a cut."""
        kind = self.state.draw_fault("files")
        if kind is None:
            return None
        if kind == "drop":
            return DroppedConnection(b"\xff\xd8\xff\xe0", b"application/octet-stream")
        text = f"simulated fault {kind}\n"
        return Response(text, status_code=int(kind), media_type="text/plain", headers=_fault_headers(kind))

    def _link_refused(self, request: Request, task: Task, path: str, kind: str) -> Response | None:
        now = time.time()
        expires, signature = request.query_params.get("expires"), request.query_params.get("signature")
        if expires is not None or signature is not None:
            if not (expires or "").isdigit() or not hmac.compare_digest(
                self.state.sign(path, int(expires or 0)), signature or ""
            ):
                return Response("bad link signature\n", status_code=403, media_type="text/plain")
            if now > int(expires or 0):
                return Response("link expired\n", status_code=410, media_type="text/plain")
            return None
        if kind == "origin" and self.state.origin_expired(task, now):
            return Response("origin link expired\n", status_code=410, media_type="text/plain")
        return None


class _FastJSON(JSONResponse):
    """JSON rendered by pydantic-core (a FastAPI dependency): stats of 10,000 tasks in milliseconds."""

    def render(self, content: Any) -> bytes:
        return pydantic_core.to_json(content)


def _add_controls(
    app: FastAPI, state: SimState, sender: CallbackSender, images: ImageCache, held_answers: HeldAnswers
) -> None:
    """``/_sim/*``: no auth, plain JSON, for tests and demos to steer and inspect."""

    @app.get("/_sim/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/_sim/stats")
    async def stats(request: Request) -> Response:
        # Rendered directly: FastAPI's encoder would first walk 10,000 task entries one by one.
        with_tasks = request.query_params.get("tasks", "1").lower() not in ("0", "false", "no", "off")
        data = state.stats(tasks=with_tasks)
        data["callbacks_pending"] = sender.pending()
        data["callbacks_held"] = sender.held()
        return _FastJSON(data)

    @app.get("/_sim/config")
    async def get_config() -> dict[str, Any]:
        return state.config.to_dict()

    @app.post("/_sim/config")
    async def set_config(request: Request) -> Response:
        changes = await _json_body(request)
        if not isinstance(changes, dict):
            return JSONResponse({"error": "body must be a JSON object of config fields"}, status_code=422)
        try:
            state.configure(changes)
        except ValueError as error:
            return JSONResponse({"error": str(error)}, status_code=422)
        if "submit_answer_delay" in changes:
            held_answers.wake()
        if not state.config.hold_callbacks:  # turned off: nothing stays held
            sender.release(sender.held_matching(None, None))
        return JSONResponse(state.config.to_dict())

    @app.post("/_sim/reset")
    async def reset() -> dict[str, bool]:
        sender.cancel_all()
        images.clear()
        state.reset()
        return {"ok": True}

    @app.post("/_sim/inject")
    async def inject(request: Request) -> Response:
        try:
            injection = _injection(await _json_body(request))
        except ValueError as error:
            return JSONResponse({"error": str(error)}, status_code=422)
        state.injections.append(injection)
        return JSONResponse({"queued": len(state.injections)})

    @app.post("/_sim/forget")
    async def forget(request: Request) -> Response:
        body = await _json_body(request)
        task_id = body.get("task_id") if isinstance(body, dict) and set(body) == {"task_id"} else None
        if not isinstance(task_id, str) or not task_id:
            return JSONResponse({"error": 'body must be {"task_id": "<taskId>"}'}, status_code=422)
        if not state.forget(task_id):
            return JSONResponse({"error": f"no task with taskId {task_id!r}"}, status_code=404)
        return JSONResponse({"forgotten": [task_id]})

    @app.post("/_sim/release")
    async def release(request: Request) -> Response:
        try:
            task_id, prompt = _release_target(await _json_body(request))
        except ValueError as error:
            return JSONResponse({"error": str(error)}, status_code=422)
        tasks = state.held_matching(task_id, prompt)
        if not tasks and (task_id is not None or prompt is not None):
            what = f"taskId {task_id!r}" if task_id is not None else f"prompt {prompt!r}"
            return JSONResponse({"error": f"no held task with {what}"}, status_code=404)
        now = time.time()
        for task in tasks:
            state.release(task, now)
            sender.schedule(task)
        return JSONResponse({"released": [task.task_id for task in tasks]})

    @app.post("/_sim/callbacks/release")
    async def release_callbacks(request: Request) -> Response:
        try:
            task_id, prompt = _release_target(await _json_body(request))
        except ValueError as error:
            return JSONResponse({"error": str(error)}, status_code=422)
        tasks = sender.held_matching(task_id, prompt)
        if not tasks and (task_id is not None or prompt is not None):
            # Not due yet (still generating), never held, or already sent: the test is early or wrong.
            what = f"taskId {task_id!r}" if task_id is not None else f"prompt {prompt!r}"
            return JSONResponse({"error": f"no held callback with {what}"}, status_code=404)
        sender.release(tasks)
        return JSONResponse({"released": [task.task_id for task in tasks]})


def _release_target(body: Any) -> tuple[str | None, str | None]:
    """
    Read ``(task_id, prompt)`` from a release body; ``(None, None)`` means everything held.

    :param body: the JSON body of ``/_sim/release`` or ``/_sim/callbacks/release``.
    """
    if not isinstance(body, dict):
        raise ValueError('body must be a JSON object: {"task_id": ...}, {"prompt": ...} or {"all": true}')
    unknown = set(body) - {"task_id", "prompt", "all"}
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    if len(body) != 1:
        raise ValueError("give exactly one of task_id, prompt or all")
    if body.get("all") is True:
        return None, None
    value = body.get("task_id", body.get("prompt"))
    if "all" in body or not isinstance(value, str) or not value:
        raise ValueError("task_id and prompt must be non-empty strings; all must be true")
    return (value, None) if "task_id" in body else (None, value)


def _injection(body: Any) -> Injection:
    """Check an ``/_sim/inject`` body; a drop needs no code."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    unknown = set(body) - {"endpoint", "code", "times", "retry_after", "msg", "http_status", "drop", "echo"}
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    endpoint = body.get("endpoint", "*")
    if endpoint not in (*ENDPOINTS, "*"):
        raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)} or *")
    drop = bool(body.get("drop", False))
    code, times = body.get("code", 500 if drop else None), body.get("times", 1)
    if isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 599:
        raise ValueError("code must be an integer between 100 and 599")
    if isinstance(times, bool) or not isinstance(times, int) or times < 1:
        raise ValueError("times must be an integer >= 1")
    retry_after = body.get("retry_after")
    if retry_after is not None and (
        isinstance(retry_after, bool) or not isinstance(retry_after, int | float)
    ):
        raise ValueError("retry_after must be a number of seconds")
    http_status = body.get("http_status")
    if http_status is not None and not isinstance(http_status, bool):
        raise ValueError("http_status must be true, false or null")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise ValueError("echo must be true or false")
    if echo and drop:
        raise ValueError("echo writes the request into the answer's msg, so it cannot go with drop")
    msg = body.get("msg")
    msg = None if msg is None else str(msg)
    return Injection(endpoint, code, times, retry_after, msg, http_status, drop, echo)


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def _json_body(request: Request) -> Any:
    return _parse(await request.body())


def _parse(raw: bytes) -> Any:
    """Decode a request body as JSON; ``None`` when it is empty or not JSON."""
    try:
        return json.loads(raw or b"null")
    except ValueError:
        return None


def _echo(request: Request, raw: bytes) -> str:
    """Render the request as received: method, path, every header line (values verbatim), the body."""
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    lines = [f"{request.method} {target}"]
    lines += [f"{name.decode('latin-1')}: {value.decode('latin-1')}" for name, value in request.headers.raw]
    return "request as received:\n" + "\n".join(lines) + "\n\n" + raw.decode("utf-8", errors="replace")


def _fault_headers(kind: str) -> dict[str, str] | None:
    """Give a random 429 a ``Retry-After``, as the real rate limit tells the client when to come back."""
    return {"Retry-After": "1"} if kind == "429" else None


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
