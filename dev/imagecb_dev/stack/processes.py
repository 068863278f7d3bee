"""
One Airflow component as an OS process: started in its own session, logging to its own file,
stopped or killed together with every process it started.

A component's *tree* is its process and all descendants found through psutil. Task processes
set their own process group (``setpgid`` in the task SDK's supervisor), so a ``killpg`` would
miss them; walking the tree does not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path

import psutil

#: ``setpriv --pdeathsig`` ends a component when the process that started it dies (even by SIGKILL).
_SETPRIV = shutil.which("setpriv")


def live_tree(pid: int | None) -> list[psutil.Process]:
    """
    Return a process and its descendants that are still running (zombies left out).

    :param pid: the root's pid; ``None`` gives an empty list
    """
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    return [p for p in procs if _running(p)]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def signal_all(procs: Iterable[psutil.Process], sig: int) -> None:
    """
    Send a signal to each process, ignoring those already gone.

    :param procs: the processes
    :param sig: the signal number
    """
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)


def wait_gone(procs: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    """
    Wait until the processes have ended (zombies count as ended); return those still running.

    :param procs: the processes
    :param timeout: seconds to wait at most
    """
    deadline = time.monotonic() + timeout
    left = [p for p in procs if _running(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _running(p)]
    return left


def kill_tree(pid: int | None, sig: int = signal.SIGKILL, timeout: float = 10.0) -> list[int]:
    """
    Signal a whole process tree; with SIGKILL, freeze it first so no new child escapes.

    :param pid: the root's pid
    :param sig: the signal
    :param timeout: with SIGKILL, seconds to wait for every process to be gone
    :return: the pids signalled
    """
    procs = live_tree(pid)
    if sig == signal.SIGKILL:
        seen: dict[int, psutil.Process] = {}
        while True:  # SIGSTOP the tree until it stops growing
            new = [p for p in live_tree(pid) if p.pid not in seen]
            if not new:
                break
            signal_all(new, signal.SIGSTOP)
            seen.update((p.pid, p) for p in new)
        procs = list(seen.values()) or procs
    signal_all(procs, sig)
    if sig == signal.SIGKILL:
        wait_gone(procs, timeout)
    return [p.pid for p in procs]


class ManagedProcess:
    """
    Run one component (``airflow scheduler``, ...) and keep its log.

    :param name: the component's name (``scheduler``, ``api-server``, ...)
    :param argv: the command line
    :param env: the complete environment of the process
    :param log_path: the file that receives its stdout and stderr (appended to on restart)
    :param cwd: its working directory
    """

    def __init__(
        self, name: str, argv: Sequence[str], env: dict[str, str], log_path: Path, cwd: Path
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at: float = 0.0
        self.starts = 0
        self._log_offset = 0

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.pid}, alive={self.alive()})"

    @property
    def pid(self) -> int | None:
        """The component's main pid, or ``None`` when it is not running."""
        return self.popen.pid if self.popen is not None and self.alive() else None

    def start(self) -> None:
        """Start the process (again); its log gets a separator line."""
        if self.alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = self.argv
        if _SETPRIV and threading.current_thread() is threading.main_thread():
            # the parent-death signal belongs to the thread that forks: only the main thread lives long
            argv = [_SETPRIV, "--pdeathsig", "TERM", "--", *argv]
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            log.write(f"\n==== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started_at = time.time()
        self.starts += 1

    def alive(self) -> bool:
        """Tell whether the main process is running."""
        if self.popen is None or self.popen.poll() is not None:
            return False
        try:
            return psutil.Process(self.popen.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    @property
    def returncode(self) -> int | None:
        """The exit status once the main process has ended (negative: killed by that signal)."""
        return None if self.popen is None else self.popen.poll()

    def tree(self) -> list[psutil.Process]:
        """Return the running processes of this component (main process first)."""
        return live_tree(self.pid)

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> list[int]:
        """
        Send a signal to every process of the component (SIGKILL: and wait until all are gone).

        :param sig: the signal
        :param timeout: with SIGKILL, seconds to wait for the processes to be gone
        :return: the pids signalled
        """
        pids = kill_tree(self.pid, sig, timeout)
        if sig == signal.SIGKILL:
            self._reap(timeout)
        return pids

    def terminate(self) -> list[psutil.Process]:
        """Send SIGTERM to the main process only (a graceful stop); return the tree beforehand."""
        procs = self.tree()
        if procs:
            signal_all(procs[:1], signal.SIGTERM)
        return procs

    def stop(self, timeout: float = 10.0) -> None:
        """
        Stop gracefully (SIGTERM), then SIGKILL whatever of the tree is left after ``timeout``.

        :param timeout: seconds allowed for the graceful stop
        """
        finish_stopping([(self, self.terminate())], timeout)

    def _reap(self, timeout: float) -> None:
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)

    def log_since_start(self) -> str:
        """Return what the component logged since it was last started."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(self._log_offset)
                return handle.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        """
        Return the last lines of the component's log.

        :param lines: how many lines
        """
        return tail_file(self.log_path, lines)


def finish_stopping(stopping: Sequence[tuple[ManagedProcess, list[psutil.Process]]], timeout: float) -> None:
    """
    Wait for components sent SIGTERM to end, then SIGKILL every process left of their trees.

    :param stopping: each component with the tree it had when SIGTERM was sent
    :param timeout: seconds allowed for all of them together
    """
    deadline = time.monotonic() + timeout
    for proc, _ in stopping:
        proc._reap(max(0.0, deadline - time.monotonic()))
    for proc, before in stopping:
        leftovers = {p.pid: p for p in [*before, *proc.tree()] if _running(p)}
        if leftovers:
            signal_all(leftovers.values(), signal.SIGKILL)
            wait_gone(list(leftovers.values()), 10)
        proc._reap(5)


def tail_file(path: Path, lines: int = 40) -> str:
    """
    Return the last lines of a text file ("" when it does not exist).

    :param path: the file
    :param lines: how many lines
    """
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 256 * 1024))
            last = deque(handle.read().decode(errors="replace").splitlines(), maxlen=lines)
    except FileNotFoundError:
        return ""
    return "\n".join(last)
