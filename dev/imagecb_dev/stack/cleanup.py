"""
Find and remove what stacks of ended processes left behind: processes, databases, Redis indexes.

A stack stops its processes and drops its database on stop and at interpreter exit, and its
processes get SIGTERM when the process that started them dies (``setpriv --pdeathsig``). A
SIGKILLed owner can still leave a database, a work dir or a stubborn process behind: each
running stack is recorded in ``$TMPDIR/imagecb-stacks/<database>.json`` (owner, pids, paths),
every stack start sweeps the records of ended owners, and
``python -m imagecb_dev.stack cleanup`` does it on demand. Stack processes also
carry ``IMAGECB_STACK_OWNER`` in their environment (unreadable in ``/proc`` once a process
retitles itself, as the API server does: hence the records).
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from imagecb_dev.stack.processes import kill_tree
from imagecb_dev.stack.services import Postgres, Redis, owner_is_gone

log = logging.getLogger(__name__)

#: The environment variable naming the process that started a stack process (JSON owner tag).
OWNER_ENV = "IMAGECB_STACK_OWNER"
#: One JSON file per running stack: ``{"owner", "database", "work_dir", "made_work_dir", "processes"}``.
REGISTRY = Path(tempfile.gettempdir()) / "imagecb-stacks"


def record(database: str, info: dict[str, Any]) -> None:
    """
    Record a running stack (replacing its earlier record).

    :param database: the stack's database, which names the record
    :param info: ``owner`` tag, ``work_dir``, ``made_work_dir``, ``processes`` (name -> pid, started)
    """
    REGISTRY.mkdir(parents=True, exist_ok=True)
    path = REGISTRY / f"{database}.json"
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps({"database": database, **info}))
    partial.replace(path)


def forget(database: str) -> None:
    """
    Remove a stack's record.

    :param database: the stack's database
    """
    (REGISTRY / f"{database}.json").unlink(missing_ok=True)


def _stale_records() -> list[dict[str, Any]]:
    records = []
    for path in REGISTRY.glob("*.json") if REGISTRY.exists() else []:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if owner_is_gone(info.get("owner") or {}):
            records.append(info)
    return records


def _kill_recorded(processes: dict[str, dict[str, float]]) -> list[int]:
    killed = []
    for entry in processes.values():
        try:
            proc = psutil.Process(int(entry["pid"]))
            if abs(proc.create_time() - float(entry["started"])) < 1:  # not a reused pid
                killed += kill_tree(proc.pid, signal.SIGKILL)
        except (psutil.Error, KeyError, TypeError, ValueError):
            continue
    return killed


@dataclass
class SweepReport:
    """What a sweep removed."""

    processes: list[int] = field(default_factory=list)
    databases: list[str] = field(default_factory=list)
    redis_indexes: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.processes or self.databases or self.redis_indexes)


def orphaned_processes() -> list[psutil.Process]:
    """Return the top processes of stacks whose owner has ended (their trees go with them)."""
    orphans = []
    for proc in psutil.process_iter(["pid"]):
        try:
            owner = proc.environ().get(OWNER_ENV)
            if owner and owner_is_gone(json.loads(owner)):
                orphans.append(proc)
        except (psutil.Error, ValueError):
            continue
    found = {p.pid for p in orphans}
    return [p for p in orphans if _parent_pid(p) not in found]


def _parent_pid(proc: psutil.Process) -> int | None:
    try:
        return proc.ppid()
    except psutil.Error:
        return None


def sweep(postgres: Postgres | None = None, redis: Redis | None = None) -> SweepReport:
    """
    Kill orphaned stack processes, then drop their databases and free their Redis indexes.

    :param postgres: the server to sweep (skipped when ``None``)
    :param redis: the server to sweep (skipped when ``None``)
    """
    report = SweepReport()
    for info in _stale_records():
        report.processes += _kill_recorded(info.get("processes") or {})
        if info.get("made_work_dir") and info.get("work_dir"):
            shutil.rmtree(info["work_dir"], ignore_errors=True)
        forget(info["database"])
    for proc in orphaned_processes():
        report.processes += kill_tree(proc.pid, signal.SIGKILL)
    if postgres is not None:
        report.databases = postgres.drop_stale_databases()
    if redis is not None:
        report.redis_indexes = redis.release_stale_databases()
    if report:
        log.warning("removed leftovers of ended stacks: %s", report)
    return report
