"""
Everything the simulator remembers: tasks, counters, rate windows, queued faults, credits.

A task stores only its submit time and its precomputed completion time; its state is derived
from the clock on every read, so ten thousand waiting tasks cost ten thousand small objects and
no timers. A held task (``[sim:hold]``) has no completion time until it is released. All of it is
touched only from the server's event loop, so it needs no locks.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import secrets
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from imagecb_provider.testing.simulator.config import UPLOAD_ENDPOINTS, SimulatorConfig
from imagecb_provider.testing.simulator.images import EXTENSIONS
from imagecb_provider.testing.simulator.markers import OUTCOMES, RANDOM_FAILURES, SUCCESS, Outcome, Plan
from imagecb_provider.testing.simulator.uploads import UploadStore

ENDPOINTS = ("generate", "record-info", "credit", "download-url", *UPLOAD_ENDPOINTS)


@dataclass(slots=True)
class Task:
    """
    One accepted submission; ``complete_at`` is ``None`` while it is held or when it never ends.

    ``release_delay`` is the (already scaled) time from release to completion of a held task.
    """

    task_id: str
    prompt: str
    model: str
    params: dict[str, Any]
    callback_url: str | None
    created: float
    complete_at: float | None
    outcome: Outcome
    duplicate_callback: bool
    base_url: str
    held: bool = False
    release_delay: float = 0.0
    submitted_at: str = ""  # ISO text for /_sim/stats, made once: 10,000 tasks are read often

    @property
    def aspect_ratio(self) -> str:
        return self.params.get("aspectRatio") or "16:9"

    @property
    def output_format(self) -> str:
        return self.params.get("outputFormat") or "jpeg"

    def done(self, now: float) -> bool:
        return self.complete_at is not None and now >= self.complete_at

    def success_flag(self, now: float) -> int:
        return self.outcome.success_flag if self.done(now) else 0

    def file_path(self, kind: str) -> str:
        return f"/files/{self.task_id}/{kind}.{EXTENSIONS[self.output_format]}"


@dataclass(slots=True)
class Injection:
    """A forced answer queued by ``POST /_sim/inject`` for the next ``times`` matching calls."""

    endpoint: str
    code: int
    times: int = 1
    retry_after: float | None = None
    msg: str | None = None
    http_status: bool | None = None
    drop: bool = False
    echo: bool = False


@dataclass
class Counters:
    """What ``/_sim/stats`` reports; one object so ``reset`` cannot forget a counter."""

    submissions: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    status_calls: Counter = field(default_factory=Counter)
    requests: Counter = field(default_factory=Counter)
    downloads: Counter = field(default_factory=Counter)
    injected: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    endpoint_faults: Counter = field(default_factory=Counter)
    callbacks: list[dict[str, Any]] = field(default_factory=list)


def format_time(ts: float | None, fmt: str) -> str | int | None:
    """
    Write a timestamp as the vendor might send it.

    ``iso``: ``2024-03-20T10:30:00Z``; ``space``: ``2026-01-06 08:16:56``, no zone (written in UTC:
    which zone the vendor means is unknown); ``epoch_ms``: integer milliseconds.
    """
    if ts is None:
        return None
    if fmt == "epoch_ms":
        return int(ts * 1000)
    if fmt == "space":
        return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%d %H:%M:%S")
    return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


#: What ``null_strings`` writes in an empty field.
NULL_STRING = "null"


def number(value: float) -> int | float:
    """Credits as the vendor shows them: a whole number when there is no fraction."""
    return int(value) if float(value).is_integer() else value


class SimState:
    """The mutable heart of one simulator; see the module docstring for the threading rule."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.url_secret = secrets.token_bytes(16)
        #: Submissions received whose answer is not yet handed back: a gauge, not reset.
        self.submissions_in_flight = 0
        self.reset()

    # ------------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        """Forget tasks, counters, rate windows and injections; refill credits; reseed."""
        self.tasks: dict[str, Task] = {}
        self.held: dict[str, Task] = {}
        self.counters = Counters()
        self.windows: dict[str, deque[float]] = {}
        self.injections: list[Injection] = []
        self.flaky_seen: set[str] = set()
        self.issued_hosts: set[str] = set()
        self.uploads = UploadStore()
        self.credits = self.config.credits
        self.cap_used: dict[str, int] = {}
        self._reseed()

    def _reseed(self) -> None:
        self.outcome_rng = random.Random(f"outcome-{self.config.seed}")
        self.fault_rng = random.Random(f"fault-{self.config.seed}")

    def configure(self, changes: dict[str, Any]) -> None:
        """Apply a partial config; a new ``credits`` refills the balance, a new ``seed`` reseeds."""
        self.config.update(**changes)
        if "credits" in changes:
            self.credits = self.config.credits
        if "seed" in changes:
            self._reseed()
        if "submission_cap" in changes:
            self.cap_used = {}

    # -------------------------------------------------------------- faults, limits
    def take_injection(self, endpoint: str) -> Injection | None:
        """The oldest queued injection for ``endpoint`` (or ``*``), consuming one use."""
        for index, injection in enumerate(self.injections):
            if injection.endpoint in (endpoint, "*"):
                injection.times -= 1
                if injection.times <= 0:
                    del self.injections[index]
                return injection
        return None

    def draw_fault(self, endpoint: str) -> str | None:
        """
        Draw a fault kind for a call to ``endpoint`` per ``fault_rate`` (``None``: no fault) and count it.

        Calls to endpoints outside ``fault_endpoints`` draw no random number, so they never shift
        the seeded sequence of the configured ones.
        """
        rate, kinds = self.config.fault_rate, self.config.fault_kinds
        if endpoint not in self.config.fault_endpoints or rate <= 0 or not kinds:
            return None
        if self.fault_rng.random() >= rate:
            return None
        kind = self.fault_rng.choice(list(kinds))
        self.counters.faults[kind] += 1
        self.counters.endpoint_faults[endpoint, kind] += 1
        return kind

    def capped(self, key: str) -> bool:
        """Whether the key has used up its ``submission_cap``."""
        cap = self.config.submission_cap
        return cap is not None and self.cap_used.get(key, 0) >= cap

    def rate_limited(self, key: str, now: float) -> float | None:
        """Seconds until a slot frees when the key's window is full, else ``None``."""
        window = self.windows.setdefault(key, deque())
        horizon = now - self.config.rate_limit_window
        while window and window[0] <= horizon:
            window.popleft()
        if len(window) < self.config.rate_limit_count:
            return None
        if not window:  # rate_limit_count == 0: nothing is ever allowed
            return self.config.rate_limit_window
        return max(window[0] - horizon, 0.0)

    def cost(self, model: str) -> float:
        return self.config.cost_per_image.get(model, 0.0)

    # -------------------------------------------------------------------- tasks
    def choose_outcome(self, prompt: str, plan: Plan) -> Outcome:
        """Markers first; then the flaky first-failure; then ``random_failure_rate``."""
        if plan.outcome:
            return OUTCOMES[plan.outcome]
        if plan.flaky:
            first = prompt not in self.flaky_seen
            self.flaky_seen.add(prompt)
            return OUTCOMES["internal_error"] if first else SUCCESS
        rate = self.config.random_failure_rate
        if rate > 0 and self.outcome_rng.random() < rate:
            code = self.outcome_rng.choice(sorted(RANDOM_FAILURES))
            return OUTCOMES[RANDOM_FAILURES[code]]
        return SUCCESS

    def submit(self, body: dict[str, Any], plan: Plan, base_url: str, now: float) -> Task:
        """Accept a validated body: charge it, count it, and store the task."""
        model = body.get("model") or "flux-kontext-pro"
        self.credits -= self.cost(model)
        latency = plan.latency if plan.latency is not None else self.config.latency
        scaled = latency * self.config.time_factor
        task = Task(
            task_id=uuid.uuid4().hex,
            prompt=body["prompt"],
            model=model,
            params={k: v for k, v in body.items() if k != "callBackUrl"},
            callback_url=body.get("callBackUrl"),
            created=now,
            complete_at=None if plan.never or plan.hold else now + scaled,
            outcome=self.choose_outcome(body["prompt"], plan),
            duplicate_callback=plan.duplicate_callback or self.config.duplicate_callbacks,
            base_url=base_url,
            held=plan.hold,
            release_delay=(plan.latency or 0.0) * self.config.time_factor,
            submitted_at=datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
        )
        self.tasks[task.task_id] = task
        if task.held:
            self.held[task.task_id] = task
        self.counters.submissions[task.prompt] += 1
        self.issued_hosts.add(_netloc(base_url))
        return task

    def held_matching(self, task_id: str | None, prompt: str | None) -> list[Task]:
        """Find the held tasks with this id, or with exactly this prompt, or all of them (both ``None``)."""
        if task_id is not None:
            return [self.held[task_id]] if task_id in self.held else []
        return [t for t in self.held.values() if prompt is None or t.prompt == prompt]

    def release(self, task: Task, now: float) -> None:
        """Let a held task finish ``release_delay`` seconds from ``now``."""
        self.held.pop(task.task_id, None)
        task.held = False
        task.complete_at = now + task.release_delay

    def file_urls(self, task: Task, base_url: str) -> dict[str, str]:
        """Absolute origin and result URLs on the host the client used."""
        self.issued_hosts.add(_netloc(base_url))
        root = base_url.rstrip("/")
        return {
            "originImageUrl": root + task.file_path("origin"),
            "resultImageUrl": root + task.file_path("result"),
        }

    def record(self, task: Task, base_url: str, now: float) -> dict[str, Any]:
        """The task in the exact shape of the vendor's record-info ``data``."""
        done = task.done(now)
        succeeded = done and task.outcome is SUCCESS
        fmt = self.config.timestamp_format
        record = {
            "taskId": task.task_id,
            "paramJson": json.dumps(task.params, separators=(",", ":"), ensure_ascii=False),
            "completeTime": format_time(task.complete_at if done else None, fmt),
            "response": self.file_urls(task, base_url) if succeeded else None,
            "successFlag": task.success_flag(now),
            "errorCode": task.outcome.error_code if done else None,
            "errorMessage": task.outcome.error_message if done else "",
            "createTime": format_time(task.created, fmt),
        }
        if self.config.null_strings:
            if record["response"] is None:
                record["response"] = {"originImageUrl": None, "resultImageUrl": None}
            record = _null_strings(record)
        return record

    def forget(self, task_id: str) -> bool:
        """Forget a task as the vendor does once its record expires; ``False`` when it is not known."""
        self.held.pop(task_id, None)
        return self.tasks.pop(task_id, None) is not None

    # --------------------------------------------------------------------- files
    def sign(self, path: str, expires: int) -> str:
        return hmac.new(self.url_secret, f"{path}:{expires}".encode(), hashlib.sha256).hexdigest()[:32]

    def fresh_link(self, path: str, base_url: str, now: float) -> str:
        expires = int(now + self.config.download_url_ttl)
        return f"{base_url.rstrip('/')}{path}?expires={expires}&signature={self.sign(path, expires)}"

    def origin_expired(self, task: Task, now: float) -> bool:
        return task.complete_at is not None and now > task.complete_at + self.config.origin_ttl

    # --------------------------------------------------------------------- stats
    def stats(self, now: float | None = None, *, tasks: bool = True) -> dict[str, Any]:
        """Snapshot every counter as JSON-ready data (``GET /_sim/stats``); ``tasks=False`` skips the map."""
        now = time.time() if now is None else now
        c = self.counters
        data = {
            "submissions": dict(c.submissions),
            "submissions_total": sum(c.submissions.values()),
            "rejected": {str(code): n for code, n in c.rejected.items()},
            "status_calls": dict(c.status_calls),
            "status_calls_total": sum(c.status_calls.values()),
            "callbacks": list(c.callbacks),
            "credits": number(self.credits),
            "requests": dict(c.requests),
            "downloads": dict(c.downloads),
            "injected": {str(k): n for k, n in c.injected.items()},
            "faults": dict(c.faults),
            "faults_by_endpoint": self._faults_by_endpoint(),
            "pending_injections": sum(i.times for i in self.injections),
            "held": list(self.held),
            "submissions_in_flight": self.submissions_in_flight,
        }
        data |= self.uploads.stats(now, self.config.upload_ttl)
        if tasks:
            data["tasks"] = {tid: self._task_stats(t, now) for tid, t in self.tasks.items()}
        return data

    def _faults_by_endpoint(self) -> dict[str, dict[str, int]]:
        nested: dict[str, dict[str, int]] = {}
        for (endpoint, kind), count in self.counters.endpoint_faults.items():
            nested.setdefault(endpoint, {})[kind] = count
        return nested

    @staticmethod
    def _task_stats(task: Task, now: float) -> dict[str, Any]:
        return {
            "prompt": task.prompt,
            "model": task.model,
            "outcome": "never" if task.complete_at is None and not task.held else task.outcome.name,
            "successFlag": task.success_flag(now),
            "held": task.held,
            "submitted_at": task.submitted_at,
        }


def _null_strings(value: Any) -> Any:
    """Write ``"null"`` for every ``None`` or ``""`` in a record (nested objects too)."""
    if isinstance(value, dict):
        return {key: _null_strings(item) for key, item in value.items()}
    return NULL_STRING if value is None or value == "" else value


def _netloc(url: str) -> str:
    return urlsplit(url).netloc.lower()
