"""
Process control, measuring and logs of a running stack, mixed into :class:`.AirflowStack`.

Kept apart from the life cycle in :mod:`.core`: everything here works on the components of a
stack that is already up.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from imagecb_dev.stack.client import AirflowClient
from imagecb_dev.stack.errors import StackError
from imagecb_dev.stack.processes import ManagedProcess, kill_tree, tail_file
from imagecb_dev.stack.sampler import SlotSampler, TreeSampler

log = logging.getLogger(__name__)

#: The process title the task SDK gives a running task: ``airflow worker -- <task instance id>``.
TASK_PROCESS_TITLE = "airflow worker -- "


class StackControl:
    """Kill, restart and inspect the components of a running stack; sample them; read their logs."""

    components: dict[str, ManagedProcess]
    component_names: tuple[str, ...]
    username: str
    password: str
    stop_timeout: float

    if TYPE_CHECKING:  # provided by AirflowStack

        @property
        def client(self) -> AirflowClient: ...

        @property
        def _home(self) -> Path: ...

        def wait_ready(
            self,
            components: Iterable[str] | None = None,
            *,
            since: float | None = None,
            timeout: float | None = None,
        ) -> None: ...

        def _record(self) -> None: ...

    def _component(self, name: str) -> ManagedProcess:
        try:
            return self.components[name]
        except KeyError:
            raise KeyError(
                f"no component {name!r}; this stack runs {', '.join(self.component_names)}"
            ) from None

    def pid(self, component: str) -> int | None:
        """
        Return a component's main pid (``None`` when it is down).

        :param component: e.g. ``scheduler``
        """
        return self._component(component).pid

    def alive(self, component: str) -> bool:
        """
        Tell whether a component's main process runs.

        :param component: e.g. ``scheduler``
        """
        return self._component(component).alive()

    def processes(self, component: str) -> list[psutil.Process]:
        """
        Return every running process of a component (main process first).

        :param component: e.g. ``scheduler``
        """
        return self._component(component).tree()

    def kill(self, component: str, sig: int = signal.SIGKILL) -> list[int]:
        """
        Send a signal to a component's whole process tree (with the scheduler of a LocalExecutor
        stack, or a Celery worker, that includes the running tasks); return the pids.

        :param component: e.g. ``triggerer``
        :param sig: the signal (SIGKILL waits until every process is gone)
        """
        return self._component(component).kill(sig)

    def start_component(self, component: str, *, wait: bool = True) -> None:
        """
        Start a component that is down, and wait until it is ready.

        :param component: e.g. ``triggerer``
        :param wait: wait for readiness (a fresh heartbeat)
        """
        proc = self._component(component)
        proc.kill()  # reap the dead one and any leftover of its tree
        since = time.time()
        proc.start()
        self._record()
        if wait:
            self.wait_ready([component], since=since)

    def restart(self, component: str, *, graceful: bool = True, wait: bool = True) -> None:
        """
        Stop a component (SIGTERM, or SIGKILL when not ``graceful``) and start it again.

        :param component: e.g. ``scheduler``
        :param graceful: SIGTERM first; otherwise SIGKILL the tree at once
        :param wait: wait for readiness
        """
        proc = self._component(component)
        if graceful:
            proc.stop(self.stop_timeout)
        else:
            proc.kill()
        self.start_component(component, wait=wait)

    def task_processes(self) -> dict[str, int]:
        """Return the running task processes of this stack: task instance id -> pid."""
        found = {}
        for proc in self.components.values():
            for child in proc.tree():
                try:
                    title = " ".join(child.cmdline())
                except psutil.Error:
                    continue
                if title.startswith(TASK_PROCESS_TITLE):
                    found[title[len(TASK_PROCESS_TITLE) :].strip()] = child.pid
        return found

    def task_pid(
        self, dag_id: str, run_id: str, task_id: str, map_index: int = -1, *, timeout: float = 60.0
    ) -> int:
        """
        Wait until a task instance runs and return its task process's pid.

        The REST API's ``pid`` (set when the task starts) is checked against the process titles
        of this stack's processes (``airflow worker -- <ti id>``), which works for both executors.

        :param dag_id: the DAG id
        :param run_id: the run id
        :param task_id: the task id
        :param map_index: the map index (-1 when not mapped)
        :param timeout: seconds to wait for it to run
        """
        deadline = time.monotonic() + timeout
        while True:
            ti = self.client.task_instance(dag_id, run_id, task_id, map_index)
            if ti["state"] == "running":
                pid = self.task_processes().get(ti["id"])
                if pid is not None:
                    if ti.get("pid") not in (None, pid):
                        log.warning("task %s: REST pid %s, process title says %s", task_id, ti["pid"], pid)
                    return pid
            if time.monotonic() > deadline:
                raise StackError(f"{task_id}[{map_index}] has no running process after {timeout:g}s: {ti}")
            time.sleep(0.3)

    def kill_task(
        self, dag_id: str, run_id: str, task_id: str, map_index: int = -1, sig: int = signal.SIGKILL
    ) -> int:
        """
        Kill one running task's process (and its children); its supervisor reports the failure.

        :param dag_id: the DAG id
        :param run_id: the run id
        :param task_id: the task id
        :param map_index: the map index (-1 when not mapped)
        :param sig: the signal
        :return: the pid killed
        """
        pid = self.task_pid(dag_id, run_id, task_id, map_index)
        kill_tree(pid, sig)
        return pid

    # ------------------------------------------------------------------ measuring
    def sample(self, component: str, interval: float = 0.5) -> TreeSampler:
        """
        Return a started sampler of a component's tree (peak RSS, CPU seconds); ``halt()`` it,
        or use it as a context manager, then read ``.stats``.

        :param component: e.g. ``triggerer``
        :param interval: seconds between samples
        """
        proc = self._component(component)
        sampler = TreeSampler(component, lambda: proc.pid, interval)
        sampler.begin()
        return sampler

    def sample_slots(self, interval: float = 1.0) -> SlotSampler:
        """
        Return a started sampler of running/queued/deferred task instances; ``halt()`` it, then
        read ``.peak_running``.

        :param interval: seconds between samples
        """
        sampler = SlotSampler(AirflowClient(self.client.url, self.username, self.password), interval)
        sampler.begin()
        return sampler

    # ------------------------------------------------------------------ logs
    def log_path(self, component: str) -> Path:
        """
        Return the file holding a component's stdout and stderr (``bootstrap`` too).

        :param component: e.g. ``scheduler``
        """
        if component == "bootstrap":
            return self._home / "processes" / "bootstrap.log"
        return self._component(component).log_path

    def logs(self, component: str, tail: int = 50) -> str:
        """
        Return the last lines of a component's log.

        :param component: e.g. ``scheduler``, or ``bootstrap``
        :param tail: how many lines
        """
        return tail_file(self.log_path(component), tail)

    def task_log(
        self, dag_id: str, run_id: str, task_id: str, map_index: int = -1, try_number: int = 1
    ) -> str:
        """
        Return a task try's log file as written on disk ("" when missing).

        :param dag_id: the DAG id
        :param run_id: the run id
        :param task_id: the task id
        :param map_index: the map index (-1 when not mapped)
        :param try_number: the try
        """
        folder = self.task_log_folder / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        if map_index >= 0:
            folder /= f"map_index={map_index}"
        path = folder / f"attempt={try_number}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def diagnostics(self, components: Iterable[str] | None = None, tail: int = 30) -> str:
        """
        Return the log tails of components, for a failure message.

        :param components: which (default: all)
        :param tail: lines per component
        """
        parts = []
        for name in components or self.component_names:
            proc = self.components.get(name)
            if proc is not None:
                state = f"pid {proc.pid}" if proc.alive() else f"down (exit {proc.returncode})"
                parts.append(f"---- {name} ({state}), {proc.log_path}:\n{proc.tail(tail)}")
        return "\n".join(parts)
