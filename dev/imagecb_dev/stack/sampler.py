"""
Background samplers for benchmarks: a component's memory and CPU, and the worker slots in use.

CPU is counted as the sum, over the live processes of the tree, of their own CPU time plus the
CPU time of the children they have reaped. That sum only grows and loses nothing when a
short-lived task process ends between two samples (its parent reaps it), so the CPU seconds
over a window are the difference between the last and the first sample.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

import psutil

from imagecb_dev.stack.processes import live_tree

if TYPE_CHECKING:
    from imagecb_dev.stack.client import AirflowClient

MB = 1024 * 1024


@dataclass
class TreeSample:
    """One sample of a process tree: seconds since the window opened, memory, CPU, process count."""

    at: float
    rss_mb: float
    cpu_seconds: float
    processes: int


@dataclass
class TreeStats:
    """What a :class:`TreeSampler` saw: peak memory, CPU used over the window, the samples."""

    component: str
    peak_rss_mb: float = 0.0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    peak_processes: int = 0
    samples: list[TreeSample] = field(default_factory=list)

    @property
    def cpu_percent(self) -> float:
        """Average CPU use over the window, in percent of one core."""
        return 100.0 * self.cpu_seconds / self.wall_seconds if self.wall_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Return the figures (without the samples), rounded for a report."""
        return {
            "component": self.component,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "cpu_seconds": round(self.cpu_seconds, 2),
            "cpu_percent": round(self.cpu_percent, 1),
            "wall_seconds": round(self.wall_seconds, 1),
            "peak_processes": self.peak_processes,
        }


def _tree_figures(pid: int | None) -> tuple[float, float, int, float | None]:
    """Return RSS (MB), cumulative CPU (s), process count and the root's start time of a tree."""
    rss = cpu = 0.0
    procs = live_tree(pid)
    root_started = None
    for proc in procs:
        try:
            with proc.oneshot():
                rss += proc.memory_info().rss
                times = proc.cpu_times()
                cpu += times.user + times.system + times.children_user + times.children_system
                if proc.pid == pid:
                    root_started = proc.create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return rss / MB, cpu, len(procs), root_started


class _Sampler(threading.Thread):
    """A daemon thread that calls ``sample()`` every ``interval`` seconds until stopped."""

    def __init__(self, name: str, interval: float) -> None:
        super().__init__(name=name, daemon=True)
        self.interval = interval
        self._halt = threading.Event()
        self.started_at = 0.0
        self.errors: list[str] = []

    def run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception as error:  # a sampler must never kill the benchmark
                self.errors.append(f"{type(error).__name__}: {error}")
            if self._halt.wait(self.interval):
                break
        self.sample_safely()

    def sample_safely(self) -> None:
        try:
            self.sample()
        except Exception as error:
            self.errors.append(f"{type(error).__name__}: {error}")

    def sample(self) -> None:
        raise NotImplementedError

    def begin(self) -> None:
        self.started_at = time.monotonic()
        self.start()

    def halt(self) -> None:
        self._halt.set()
        self.join(timeout=30)

    def __enter__(self) -> Self:
        if self.ident is None:  # not started yet (AirflowStack.sample* hand out started ones)
            self.begin()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.halt()


class TreeSampler(_Sampler):
    """
    Sample the process tree of one component: peak RSS and the CPU seconds used.

    The component may be restarted while sampled: each main process counts from its own start
    (or from the window's opening if it was already running).

    :param component: the component's name, for the report
    :param pid_of: returns the component's current main pid (``None`` while it is down)
    :param interval: seconds between samples
    """

    def __init__(self, component: str, pid_of: Callable[[], int | None], interval: float = 0.5) -> None:
        super().__init__(f"sampler-{component}", interval)
        self.pid_of = pid_of
        self.stats = TreeStats(component)
        self._cpu_by_root: dict[int, tuple[float, float]] = {}  # pid -> (cpu at first sight, last cpu)
        self._opened_wall = time.time()

    def begin(self) -> None:
        self._opened_wall = time.time()
        super().begin()

    def sample(self) -> None:
        pid = self.pid_of()
        rss, cpu, count, root_started = _tree_figures(pid)
        if pid is not None and root_started is not None:
            if pid not in self._cpu_by_root:
                baseline = 0.0 if root_started >= self._opened_wall else cpu
                self._cpu_by_root[pid] = (baseline, cpu)
            self._cpu_by_root[pid] = (self._cpu_by_root[pid][0], cpu)
        stats = self.stats
        stats.wall_seconds = time.monotonic() - self.started_at
        stats.cpu_seconds = sum(last - first for first, last in self._cpu_by_root.values())
        stats.peak_rss_mb = max(stats.peak_rss_mb, rss)
        stats.peak_processes = max(stats.peak_processes, count)
        stats.samples.append(TreeSample(round(stats.wall_seconds, 2), rss, stats.cpu_seconds, count))


@dataclass
class SlotSample:
    """Task instances counted at one moment (seconds since the window opened)."""

    at: float
    running: int
    queued: int
    deferred: int


class SlotSampler(_Sampler):
    """
    Sample how many task instances are running, queued and deferred (over all DAG runs).

    ``running`` is the number of worker slots in use; ``running + queued`` is what the
    executor holds against ``parallelism``.

    :param client: a client of the stack's API
    :param interval: seconds between samples
    """

    def __init__(self, client: AirflowClient, interval: float = 1.0) -> None:
        super().__init__("sampler-slots", interval)
        self.client = client
        self.samples: list[SlotSample] = []

    def halt(self) -> None:
        super().halt()
        self.client.close()

    def sample(self) -> None:
        counts = {s: self.client.count_task_instances(s) for s in ("running", "queued", "deferred")}
        self.samples.append(SlotSample(round(time.monotonic() - self.started_at, 2), **counts))

    @property
    def peak_running(self) -> int:
        """The most task instances seen running at once."""
        return max((s.running for s in self.samples), default=0)

    @property
    def peak_in_executor(self) -> int:
        """The most task instances seen running or queued at once."""
        return max((s.running + s.queued for s in self.samples), default=0)

    @property
    def peak_deferred(self) -> int:
        """The most task instances seen deferred at once."""
        return max((s.deferred for s in self.samples), default=0)

    def as_dict(self) -> dict[str, Any]:
        """Return the peaks and the sample count."""
        return {
            "peak_running": self.peak_running,
            "peak_in_executor": self.peak_in_executor,
            "peak_deferred": self.peak_deferred,
            "samples": len(self.samples),
        }
