"""
:class:`AirflowStack`: a real Airflow deployment (separate API server, scheduler, DAG processor,
triggerer and, with Celery, a worker) on its own PostgreSQL database, started and stopped from
Python.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from imagecb_dev.stack.cleanup import OWNER_ENV, forget, record, sweep
from imagecb_dev.stack.client import AirflowClient
from imagecb_dev.stack.control import StackControl
from imagecb_dev.stack.environment import (
    SCRIPTS_DIR,
    Secrets,
    StackSettings,
    airflow_env,
    free_port,
    port_is_free,
    process_env,
    shell_exports,
)
from imagecb_dev.stack.errors import RunTimeout, StackAPIError, StackError
from imagecb_dev.stack.processes import ManagedProcess, finish_stopping
from imagecb_dev.stack.seed import seed, uri_connections
from imagecb_dev.stack.services import Postgres, Redis, owner_tag
from imagecb_dev.stack.template import ensure_template

log = logging.getLogger(__name__)

#: The source checkout this harness lives in (dev/imagecb_dev/stack/core.py): its dags/ and plugins/.
REPO_ROOT = Path(__file__).resolve().parents[3]
EXECUTORS = ("LocalExecutor", "CeleryExecutor")
CORE_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
CELERY_WORKER = "celery-worker"
#: The pools a stack gets when none are given (``include_deferred`` False).
DEFAULT_POOLS: Mapping[str, int] = {"imagecb_submissions": 1}
#: Where each component's heartbeat shows in ``GET /api/v2/monitor/health``.
HEALTH_KEYS = {"scheduler": "scheduler", "triggerer": "triggerer", "dag-processor": "dag_processor"}

_RUNNING: weakref.WeakSet[AirflowStack] = weakref.WeakSet()


class AirflowStack(StackControl):
    """
    Run a real Airflow deployment of separate processes on its own PostgreSQL database.

    Use it as a context manager (or call :meth:`start` and :meth:`stop`). Start-up checks the
    services first and raises :class:`StackUnavailable` at once when one does not answer.

    :param executor: ``LocalExecutor`` or ``CeleryExecutor`` (adds a ``celery-worker``)
    :param parallelism: ``[core] parallelism``; also the Celery worker's concurrency
    :param dags_folder: the DAG folder (default: the repository's ``dags/``)
    :param plugins_folder: the plugins folder (default: the repository's ``plugins/``)
    :param env: extra environment variables for every process (they win over the stack's)
    :param connections: conn_id -> a JSON object (str or dict) or a URI, stored in the database
    :param pools: pool name -> slots (or a dict with ``slots``, ``include_deferred``,
        ``description``); default ``{"imagecb_submissions": 1}``; ``include_deferred`` is False
    :param variables: key -> value (non-strings stored as JSON)
    :param api_port: the API server's port (default: a free one)
    :param work_dir: the folder for ``AIRFLOW_HOME``, logs and task logs (default: a temp dir,
        removed on stop unless ``keep``)
    :param keep: leave the database, the Redis index and the work dir behind on stop
    :param dag_ids: DAGs to wait for and unpause during start-up
    :param use_job_schedule: let the scheduler create runs from schedules (default False)
    :param username: the simple-auth-manager user (role admin)
    :param password: its password (default: random)
    :param postgres: where PostgreSQL is
    :param redis: where Redis is (Celery only)
    :param api_host: the address the API server binds
    :param api_workers: the API server's worker processes
    :param startup_timeout: seconds allowed for start-up (each wait)
    :param stop_timeout: seconds allowed for a graceful stop before SIGKILL
    :param use_template: copy the database from a migrated template (built once, kept between
        runs) instead of migrating a new one
    :param archive_roots: the folders (or ``s3://``, ``gs://`` prefixes) whose reports and images
        the contact sheet may serve (``[imagecb] archive_roots``); default: the system temp dir,
        where tests archive; ``()`` leaves the setting unset
    """

    def __init__(
        self,
        *,
        executor: str = "LocalExecutor",
        parallelism: int = 16,
        dags_folder: str | Path | None = None,
        plugins_folder: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        connections: Mapping[str, str | Mapping[str, Any]] | None = None,
        pools: Mapping[str, int | Mapping[str, Any]] | None = None,
        variables: Mapping[str, Any] | None = None,
        api_port: int | None = None,
        work_dir: str | Path | None = None,
        keep: bool = False,
        dag_ids: Sequence[str] = (),
        use_job_schedule: bool = False,
        username: str = "admin",
        password: str | None = None,
        postgres: Postgres | None = None,
        redis: Redis | None = None,
        api_host: str = "127.0.0.1",
        api_workers: int = 1,
        startup_timeout: float = 180.0,
        stop_timeout: float = 5.0,
        use_template: bool = True,
        archive_roots: Sequence[str | Path] | None = None,
    ) -> None:
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
        self.executor = executor
        self.parallelism = parallelism
        self.dags_folder = Path(dags_folder or REPO_ROOT / "dags").resolve()
        self.plugins_folder = Path(plugins_folder or REPO_ROOT / "plugins").resolve()
        self.extra_env = dict(env or {})
        self.connections = {
            k: v if isinstance(v, str) else json.dumps(v) for k, v in (connections or {}).items()
        }
        self.pools = _pool_specs(DEFAULT_POOLS if pools is None else pools)
        self.variables = dict(variables or {})
        self.requested_port = api_port
        self.requested_work_dir = Path(work_dir).resolve() if work_dir else None
        self.keep = keep
        self.dag_ids = list(dag_ids)
        self.use_job_schedule = use_job_schedule
        self.username = username
        self.password = password or secrets.token_urlsafe(12)
        self.postgres = postgres or Postgres()
        self.redis = redis or Redis()
        self.api_host = api_host
        self.api_workers = api_workers
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.use_template = use_template
        # Tests archive under the temp dir (pytest's tmp_path); `env` can still set another value.
        roots = (tempfile.gettempdir(),) if archive_roots is None else archive_roots
        self.archive_roots = tuple(str(root) for root in roots)

        self.work_dir: Path | None = None
        self.database: str | None = None
        self.redis_index: int | None = None
        self.settings: StackSettings | None = None
        self.airflow_env: dict[str, str] = {}
        self.components: dict[str, ManagedProcess] = {}
        self.timings: dict[str, float] = {}
        self._client: AirflowClient | None = None
        self._made_work_dir = False
        self._started = False
        self._pending_bootstrap: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self._started else "stopped"
        return f"AirflowStack({self.executor}, {state}, url={self.url!r}, db={self.database!r})"

    # ------------------------------------------------------------------ public facts
    @property
    def url(self) -> str | None:
        """The API server's and UI's base URL, e.g. ``http://localhost:8080``."""
        return self.settings.url if self.settings else None

    @property
    def client(self) -> AirflowClient:
        """The REST client, logged in as :attr:`username`."""
        if self._client is None:
            raise StackError("the stack is not started")
        return self._client

    @property
    def task_log_folder(self) -> Path:
        """Where task logs are written (``<work_dir>/logs``)."""
        return self._home / "logs"

    @property
    def component_names(self) -> tuple[str, ...]:
        """The components this stack runs."""
        return CORE_COMPONENTS + ((CELERY_WORKER,) if self.executor == "CeleryExecutor" else ())

    @property
    def _home(self) -> Path:
        if self.work_dir is None:
            raise StackError("the stack is not started")
        return self.work_dir

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> AirflowStack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> AirflowStack:
        """Check the services, prepare the database, start every component, wait until ready."""
        if self._started:
            return self
        began = time.monotonic()
        self._started = True
        _RUNNING.add(self)
        try:
            self._timed("services", self._check_services)
            self._timed("database", self._create_database)
            self._prepare_home()
            self._timed("bootstrap", self._bootstrap)
            self._timed("processes", self._start_processes)
            for dag_id in self.dag_ids:
                self._timed(f"dag {dag_id}", lambda d=dag_id: self.wait_for_dag(d))
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = round(time.monotonic() - began, 2)
        log.info(
            "Airflow stack (%s) ready in %.1fs at %s: %s",
            self.executor,
            self.timings["total"],
            self.url,
            self.timings,
        )
        return self

    def _timed(self, name: str, step: Any) -> None:
        began = time.monotonic()
        step()
        self.timings[name] = round(time.monotonic() - began, 2)

    def _check_services(self) -> None:
        self.postgres.check()
        celery = self.executor == "CeleryExecutor"
        if celery:
            self.redis.check()
        sweep(self.postgres, self.redis if celery else None)

    def _create_database(self) -> None:
        template = None
        if self.use_template:
            migrate_env = process_env({"AIRFLOW__CORE__LOAD_EXAMPLES": "False"}, self.extra_env)
            template = ensure_template(self.postgres, migrate_env, self.startup_timeout)
        self.database = self.postgres.create_database(template)
        if self.executor == "CeleryExecutor":
            self.redis_index = self.redis.claim_database()

    def _prepare_home(self) -> None:
        if self.requested_work_dir:
            self.work_dir = self.requested_work_dir
            self.work_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.work_dir = Path(tempfile.mkdtemp(prefix=f"imagecb-stack-{self.database}-"))
            self._made_work_dir = True
        port = self.requested_port or free_port(self.api_host)
        if self.requested_port and not port_is_free(port, self.api_host):
            raise StackError(f"port {port} on {self.api_host} is taken: pass another api_port (or none)")
        passwords = self.work_dir / "passwords.json"
        passwords.write_text(json.dumps({self.username: self.password}) + "\n")
        db = self.database or ""
        self.settings = StackSettings(
            airflow_home=self.work_dir,
            sql_alchemy_conn=self.postgres.sqlalchemy_url(db),
            executor=self.executor,
            parallelism=self.parallelism,
            dags_folder=self.dags_folder,
            plugins_folder=self.plugins_folder,
            api_host=self.api_host,
            api_port=port,
            worker_log_port=free_port(),
            trigger_log_port=free_port(),
            users=f"{self.username}:admin",
            passwords_file=passwords,
            secrets=Secrets.generate(),
            use_job_schedule=self.use_job_schedule,
            celery_broker=self.redis.broker_url(self.redis_index) if self.redis_index is not None else None,
            celery_result_backend=self.postgres.celery_result_backend(db),
            api_workers=self.api_workers,
            archive_roots=self.archive_roots,
        )
        self.airflow_env = airflow_env(self.settings) | self.extra_env
        # An airflow.cfg that exists keeps each process from writing its own (with its own keys).
        (self.work_dir / "airflow.cfg").write_text("# settings come from AIRFLOW__* variables: see env.sh\n")
        (self.work_dir / "env.sh").write_text(shell_exports(self.airflow_env))
        self._client = AirflowClient(self.settings.url, self.username, self.password)

    def _bootstrap(self) -> None:
        """
        Migrate (unless copied from the template); write pools, variables and JSON connections.

        Connections given as URIs need Airflow's parser: a subprocess stores them while the
        components start (they are read by tasks only), and start-up waits for it.
        """
        if not self.use_template:
            self._wait_bootstrap(self._launch_bootstrap({"migrate": True}))
        seed(
            self.postgres,
            self.database or "",
            pools=self.pools,
            variables=self.variables,
            connections=self.connections,
        )
        uris = uri_connections(self.connections)
        self._pending_bootstrap = self._launch_bootstrap({"connections": uris}) if uris else None

    def _launch_bootstrap(self, spec: dict[str, Any]) -> subprocess.Popen[bytes]:
        spec_file = self._home / f"bootstrap-{'-'.join(sorted(spec))}.json"
        spec_file.write_text(json.dumps(spec))
        log_file = self.log_path("bootstrap")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "imagecb_dev.stack._bootstrap", str(spec_file)]
        with log_file.open("ab") as out:
            return subprocess.Popen(
                argv, env=self._env(), cwd=self._home, stdout=out, stderr=subprocess.STDOUT
            )

    def _wait_bootstrap(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            returncode = proc.wait(timeout=self.startup_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise StackError(
                f"bootstrap took over {self.startup_timeout:g}s:\n{self.logs('bootstrap')}"
            ) from None
        if returncode:
            raise StackError(f"bootstrap failed (exit {returncode}):\n{self.logs('bootstrap')}")

    def _env(self) -> dict[str, str]:
        return process_env(self.airflow_env) | {OWNER_ENV: json.dumps(owner_tag())}

    def _argv(self, name: str) -> list[str]:
        args = [name]
        if name == CELERY_WORKER:
            hostname = f"{self.database}@%h"
            args = ["celery", "worker", "--concurrency", str(self.parallelism),
                    "--celery-hostname", hostname, "--without-mingle", "--without-gossip"]  # fmt: skip
        return [str(SCRIPTS_DIR / "airflow"), *args]

    def _start_processes(self) -> None:
        env = self._env()
        for name in self.component_names:
            log_path = self._home / "processes" / f"{name}.log"
            self.components[name] = ManagedProcess(name, self._argv(name), env, log_path, self._home)
        since = time.time()
        for name in self.component_names:
            self.components[name].start()
        self._record()
        if self._pending_bootstrap is not None:
            self._wait_bootstrap(self._pending_bootstrap)
            self._pending_bootstrap = None
        self.wait_ready(self.component_names, since=since)

    def _record(self) -> None:
        """Write ``stack.json`` and the registry record that lets a later sweep clean up after us."""
        (self._home / "stack.json").write_text(json.dumps(self.describe(), indent=2))
        processes = {
            name: {"pid": proc.popen.pid, "started": psutil.Process(proc.popen.pid).create_time()}
            for name, proc in self.components.items()
            if proc.alive() and proc.popen is not None
        }
        info = {"owner": owner_tag(), "work_dir": str(self.work_dir), "made_work_dir": self._made_work_dir}
        record(self.database or "", info | {"processes": processes})

    def stop(self) -> None:
        """Stop every component (SIGTERM, then SIGKILL), drop the database, free the Redis index."""
        if not self._started:
            return
        began = time.monotonic()
        self._started = False
        _RUNNING.discard(self)
        try:
            if self._pending_bootstrap is not None:
                self._pending_bootstrap.kill()
                self._pending_bootstrap.wait()
            stopping = [(proc, proc.terminate()) for proc in self.components.values()]
            finish_stopping(stopping, self.stop_timeout)
        finally:
            self.timings["stop"] = round(time.monotonic() - began, 2)
            if self._client is not None:
                self._client.close()
            if self.database:
                forget(self.database)
            if self.keep:
                self._keep_leftovers()
            else:
                self._drop_leftovers()

    def _keep_leftovers(self) -> None:
        if self.database:
            self.postgres.mark_kept(self.database)
        log.warning("kept the stack's leftovers: database %s, work dir %s", self.database, self.work_dir)

    def _drop_leftovers(self) -> None:
        problems = []
        if self.database:
            try:
                self.postgres.drop_database(self.database)
            except Exception as error:
                problems.append(f"database {self.database}: {error}")
        if self.redis_index is not None:
            try:
                self.redis.release_database(self.redis_index)
            except Exception as error:
                problems.append(f"redis index {self.redis_index}: {error}")
        if self._made_work_dir and self.work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        if problems:
            log.warning("could not clean up: %s", "; ".join(problems))

    # ------------------------------------------------------------------ readiness
    def wait_ready(
        self,
        components: Iterable[str] | None = None,
        *,
        since: float | None = None,
        timeout: float | None = None,
    ) -> None:
        """
        Wait until components are up: the API answers and logs in, heartbeats are fresh, the worker is ready.

        :param components: which (default: all)
        :param since: heartbeats must be newer than this UNIX time (default: now - 1 s)
        :param timeout: seconds (default: ``startup_timeout``)
        :raises StackError: when a component exits, or on timeout, with its log tail
        """
        names = list(components or self.component_names)
        since = (time.time() - 1) if since is None else since
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while True:
            self._raise_if_dead(names)
            waiting = self._not_ready(names, since)
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise StackError(
                    f"not ready after {timeout or self.startup_timeout:g}s: {', '.join(waiting)}\n"
                    + self.diagnostics(waiting)
                )
            time.sleep(0.5)

    def _raise_if_dead(self, names: Iterable[str]) -> None:
        for name in names:
            proc = self.components[name]
            if not proc.alive():
                raise StackError(f"{name} exited with status {proc.returncode}:\n{proc.tail(60)}")

    def _not_ready(self, names: list[str], since: float) -> list[str]:
        try:
            health = self.client.health()
            if "api-server" in names:
                self.client.token(refresh=True)
        except (httpx.HTTPError, StackAPIError):
            return names
        waiting = []
        for name in names:
            if name in HEALTH_KEYS:
                entry = health.get(HEALTH_KEYS[name]) or {}
                beat = entry.get(f"latest_{HEALTH_KEYS[name]}_heartbeat")
                fresh = beat is not None and datetime.fromisoformat(beat).timestamp() >= since
                if entry.get("status") != "healthy" or not fresh:
                    waiting.append(name)
            elif name == CELERY_WORKER and " ready." not in self.components[name].log_since_start():
                waiting.append(name)
        return waiting

    def wait_for_dag(self, dag_id: str, *, timeout: float = 90.0, unpause: bool = True) -> dict[str, Any]:
        """
        Wait until the DAG processor has stored a DAG, then unpause it; return the DAG.

        :param dag_id: the DAG id
        :param timeout: seconds to wait
        :param unpause: unpause it
        :raises StackError: on timeout, with the import errors and the DAG processor's log
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                dag = self.client.dag(dag_id)
                break
            except StackAPIError as error:
                if error.status_code != 404:
                    raise
            if time.monotonic() > deadline:
                errors = "\n".join(
                    f"{e['filename']}:\n{e['stack_trace']}" for e in self.client.import_errors()
                )
                raise StackError(
                    f"DAG {dag_id!r} not parsed after {timeout:g}s from {self.dags_folder}\n"
                    f"import errors:\n{errors or '(none)'}\n" + self.diagnostics(["dag-processor"])
                )
            time.sleep(0.5)
        if unpause and dag.get("is_paused"):
            self.client.set_paused(dag_id, False)
        return dag

    def ensure_healthy(self) -> None:
        """Restart any component that is down (left so by a failed fault-injection test) and wait."""
        dead = [name for name in self.component_names if not self.components[name].alive()]
        since = time.time()
        for name in dead:
            log.warning("restarting %s, found down", name)
            self.components[name].kill()
            self.components[name].start()
        if dead:
            self._record()
        self.wait_ready(dead or ["api-server"], since=since if dead else 0)

    # ------------------------------------------------------------------ runs
    def trigger(
        self, dag_id: str, conf: dict[str, Any] | None = None, logical_date: str | None = None
    ) -> str:
        """
        Trigger a DAG run; return its run id.

        :param dag_id: the DAG id
        :param conf: the run's conf
        :param logical_date: ISO 8601 with a time zone, or ``None``
        """
        return self.client.trigger(dag_id, conf, logical_date)

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 300.0) -> str:
        """
        Wait for a run to finish; return ``success`` or ``failed``.

        :param dag_id: the DAG id
        :param run_id: the run id
        :param timeout: seconds to wait
        :raises RunTimeout: with the run's timeline, its task instances and the components' logs
        """
        try:
            return self.client.wait_for_run(dag_id, run_id, timeout)
        except RunTimeout as error:
            raise RunTimeout(f"{error}\n{self.diagnostics()}") from None

    def run(self, dag_id: str, conf: dict[str, Any] | None = None, timeout: float = 300.0) -> tuple[str, str]:
        """
        Trigger a run and wait for it; return ``(run_id, state)``.

        :param dag_id: the DAG id
        :param conf: the run's conf
        :param timeout: seconds to wait
        """
        run_id = self.trigger(dag_id, conf)
        return run_id, self.wait_for_run(dag_id, run_id, timeout)

    def describe(self) -> dict[str, Any]:
        """Return what a person needs to reach the stack: URL, login, database, pids, paths."""
        return {
            "url": self.url,
            "username": self.username,
            "password": self.password,
            "executor": self.executor,
            "database": self.database,
            "redis_index": self.redis_index,
            "work_dir": str(self.work_dir),
            "env_file": str(self._home / "env.sh") if self.work_dir else None,
            "pids": {name: proc.pid for name, proc in self.components.items()},
            "timings": self.timings,
        }

    def airflow_cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """
        Run an ``airflow`` CLI command against this stack; return the finished process.

        :param args: the arguments after ``airflow``
        :param timeout: seconds allowed
        """
        return subprocess.run(
            [str(SCRIPTS_DIR / "airflow"), *args],
            env=self._env(),
            cwd=self._home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _pool_specs(pools: Mapping[str, int | Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    specs = {}
    for name, value in pools.items():
        spec = {"slots": value} if isinstance(value, int) else dict(value)
        spec.setdefault("include_deferred", False)
        spec.setdefault("description", "")
        specs[name] = spec
    return specs


@atexit.register
def _stop_running_stacks() -> None:
    for stack in list(_RUNNING):
        with contextlib.suppress(Exception):
            stack.stop()


def running_stacks() -> list[AirflowStack]:
    """Return the stacks of this process that are started."""
    return list(_RUNNING)
