"""
A small client of Airflow's public REST API v2, logged in as a simple-auth-manager user.

Paths given to :meth:`AirflowClient.get` and friends are relative to ``/api/v2/`` unless they
start with ``/`` (``client.get("dags")`` is ``GET /api/v2/dags``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote

import httpx

from imagecb_dev.stack.errors import RunTimeout, StackAPIError

API_PREFIX = "/api/v2/"
#: DAG-run states after which nothing more happens.
FINISHED_RUN_STATES = frozenset({"success", "failed"})
#: Fields of a task instance worth showing in a timeline or a failure message.
TI_FIELDS = (
    "task_id",
    "map_index",
    "rendered_map_index",
    "state",
    "try_number",
    "start_date",
    "end_date",
    "pid",
    "hostname",
)


def _q(value: str) -> str:
    return quote(value, safe="")


class AirflowClient:
    """
    Call the REST API of one Airflow API server with a JWT from ``POST /auth/token``.

    :param url: the API server's base URL, e.g. ``http://localhost:8080``
    :param username: the user to log in as
    :param password: its password
    :param timeout: seconds per request
    """

    def __init__(self, url: str, username: str, password: str, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.username = username
        self.password = password
        self._http = httpx.Client(base_url=self.url, timeout=timeout, trust_env=False)
        self._token: str | None = None

    def __repr__(self) -> str:
        return f"AirflowClient({self.url!r}, user={self.username!r})"

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    # ---------------------------------------------------------------- plumbing
    def token(self, *, refresh: bool = False) -> str:
        """
        Return a JWT for the user (what a browser login gets too).

        :param refresh: ask for a new one even if one is cached
        """
        if self._token is None or refresh:
            response = self._http.post(
                "/auth/token", json={"username": self.username, "password": self.password}
            )
            self._raise_for(response)
            self._token = response.json()["access_token"]
        return self._token

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """
        Send an authenticated request; log in again once on 401; raise :class:`StackAPIError`.

        :param method: the HTTP method
        :param path: relative to ``/api/v2/`` unless it starts with ``/``
        :param kwargs: passed on to :meth:`httpx.Client.request` (``json``, ``params``, ...)
        """
        url = path if path.startswith("/") else API_PREFIX + path
        for attempt in (1, 2):
            headers = {"Authorization": f"Bearer {self.token(refresh=attempt == 2)}"}
            response = self._http.request(method, url, headers=headers, **kwargs)
            if response.status_code != 401:
                break
        self._raise_for(response)
        return response

    @staticmethod
    def _raise_for(response: httpx.Response) -> None:
        if response.is_error:
            request = response.request
            raise StackAPIError(request.method, str(request.url), response.status_code, response.text)

    def get(self, path: str, **params: Any) -> Any:
        """
        ``GET`` a path and return the decoded JSON.

        :param path: relative to ``/api/v2/`` unless it starts with ``/``
        :param params: query parameters
        """
        return self.request("GET", path, params=params).json()

    def post(self, path: str, json: Any = None, **params: Any) -> Any:
        """
        ``POST`` JSON to a path and return the decoded JSON answer (``None`` when empty).

        :param path: relative to ``/api/v2/`` unless it starts with ``/``
        :param json: the body
        :param params: query parameters
        """
        response = self.request("POST", path, json=json, params=params)
        return response.json() if response.content else None

    def patch(self, path: str, json: Any = None, **params: Any) -> Any:
        """
        ``PATCH`` a path with JSON and return the decoded JSON answer.

        :param path: relative to ``/api/v2/`` unless it starts with ``/``
        :param json: the body
        :param params: query parameters (e.g. ``update_mask``)
        """
        response = self.request("PATCH", path, json=json, params=params)
        return response.json() if response.content else None

    def delete(self, path: str, **params: Any) -> None:
        """
        ``DELETE`` a path.

        :param path: relative to ``/api/v2/`` unless it starts with ``/``
        :param params: query parameters
        """
        self.request("DELETE", path, params=params)

    def health(self) -> dict[str, Any]:
        """Return ``GET /api/v2/monitor/health`` (no login needed)."""
        response = self._http.get(API_PREFIX + "monitor/health")
        self._raise_for(response)
        return response.json()

    # ---------------------------------------------------------------- DAGs and runs
    def dag(self, dag_id: str) -> dict[str, Any]:
        """
        Return a DAG as the API knows it (404 as :class:`StackAPIError` until it is parsed).

        :param dag_id: the DAG id
        """
        return self.get(f"dags/{_q(dag_id)}")

    def set_paused(self, dag_id: str, paused: bool) -> None:
        """
        Pause or unpause a DAG.

        :param dag_id: the DAG id
        :param paused: the new state
        """
        self.patch(f"dags/{_q(dag_id)}", {"is_paused": paused}, update_mask="is_paused")

    def import_errors(self) -> list[dict[str, Any]]:
        """Return the DAG files that failed to import, with their tracebacks."""
        return self.get("importErrors", limit=100)["import_errors"]

    def trigger(
        self,
        dag_id: str,
        conf: dict[str, Any] | None = None,
        logical_date: str | None = None,
        *,
        run_id: str | None = None,
    ) -> str:
        """
        Trigger a DAG run and return its run id.

        :param dag_id: the DAG id
        :param conf: the run's conf
        :param logical_date: an ISO 8601 date with a time zone, or ``None`` (no logical date)
        :param run_id: the run id to use instead of a generated one
        """
        body: dict[str, Any] = {"logical_date": logical_date, "conf": conf or {}}
        if run_id:
            body["dag_run_id"] = run_id
        return self.post(f"dags/{_q(dag_id)}/dagRuns", body)["dag_run_id"]

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        """
        Return one DAG run.

        :param dag_id: the DAG id
        :param run_id: the run id
        """
        return self.get(f"dags/{_q(dag_id)}/dagRuns/{_q(run_id)}")

    def wait_for_run(
        self, dag_id: str, run_id: str, timeout: float = 300.0, *, poll_interval: float = 1.0
    ) -> str:
        """
        Wait until a run has finished and return its state (``success`` or ``failed``).

        :param dag_id: the DAG id
        :param run_id: the run id
        :param timeout: seconds to wait
        :param poll_interval: seconds between polls
        :raises RunTimeout: with the timeline of state changes seen and every task instance
        """
        started = time.monotonic()
        timeline: list[str] = []
        last = None
        while True:
            state = self.dag_run(dag_id, run_id)["state"]
            tis = self.task_instances(dag_id, run_id)
            snapshot = (state, tuple(sorted(_ti_summary(ti) for ti in tis)))
            if snapshot != last:
                timeline.append(f"{time.monotonic() - started:7.1f}s  run {state:8}  {_state_counts(tis)}")
                last = snapshot
            if state in FINISHED_RUN_STATES:
                return state
            if time.monotonic() - started > timeout:
                raise RunTimeout(
                    f"run {dag_id}/{run_id} still {state!r} after {time.monotonic() - started:.0f}s "
                    f"(timeout {timeout:g}s)\n"
                    "timeline:\n  " + "\n  ".join(timeline) + "\n" + format_task_instances(tis)
                )
            time.sleep(poll_interval)

    # ---------------------------------------------------------------- task instances
    def task_instances(
        self, dag_id: str, run_id: str, *, state: str | Sequence[str] | None = None, page_size: int = 100
    ) -> list[dict[str, Any]]:
        """
        Return every task instance of a run (mapped ones included), sorted by task and map index.

        Each is the API's dict: ``task_id``, ``map_index``, ``rendered_map_index``, ``state``,
        ``try_number``, ``start_date``, ``end_date``, ``pid``, ``hostname``, ``id``, ...

        :param dag_id: the DAG id, or ``~`` for all
        :param run_id: the run id, or ``~`` for all
        :param state: only these states
        :param page_size: task instances per request (the API allows at most 100)
        """
        params: dict[str, Any] = {"limit": page_size, "cursor": ""}
        if state is not None:
            params["state"] = [state] if isinstance(state, str) else list(state)
        path = f"dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances"
        found: list[dict[str, Any]] = []
        while True:
            page = self.get(path, **params)
            found.extend(page["task_instances"])
            if not page.get("next_cursor"):
                break
            params["cursor"] = page["next_cursor"]
        return sorted(found, key=lambda ti: (ti["task_id"], ti["map_index"]))

    def task_instance(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, Any]:
        """
        Return one task instance.

        :param dag_id: the DAG id
        :param run_id: the run id
        :param task_id: the task id
        :param map_index: the map index (-1 when not mapped)
        """
        base = f"dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}"
        return self.get(base if map_index < 0 else f"{base}/{map_index}")

    def count_task_instances(self, state: str | Sequence[str], dag_id: str = "~", run_id: str = "~") -> int:
        """
        Count task instances in some states, over all runs by default (one cheap request).

        :param state: the state or states
        :param dag_id: the DAG id, or ``~`` for all
        :param run_id: the run id, or ``~`` for all
        """
        states = [state] if isinstance(state, str) else list(state)
        page = self.get(f"dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances", state=states, limit=1)
        return int(page["total_entries"])

    def tries(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[dict[str, Any]]:
        """
        Return every try of a task instance, oldest first (``task_instance_history`` plus the latest).

        :param dag_id: the DAG id
        :param run_id: the run id
        :param task_id: the task id
        :param map_index: the map index (-1 when not mapped)
        """
        path = f"dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}/{map_index}/tries"
        tries = self.get(path, limit=100)["task_instances"]
        return sorted(tries, key=lambda ti: ti["try_number"])

    def clear(
        self,
        dag_id: str,
        run_id: str,
        task_ids: Iterable[str] | None = None,
        *,
        map_indexes: Iterable[int] | None = None,
        include_downstream: bool = False,
        include_upstream: bool = False,
        only_failed: bool = False,
        dry_run: bool = False,
        reset_dag_runs: bool = True,
    ) -> list[dict[str, Any]]:
        """
        Clear task instances of one run so they run again; return those cleared.

        The API's own defaults are ``dry_run=True`` and ``only_failed=True``; this method's
        defaults clear for real, whatever the state.

        :param dag_id: the DAG id
        :param run_id: the run id
        :param task_ids: the tasks (all when ``None``)
        :param map_indexes: only these map indexes of the given tasks
        :param include_downstream: also clear what depends on them
        :param include_upstream: also clear what they depend on
        :param only_failed: only failed (and upstream-failed) task instances
        :param dry_run: only report what would be cleared
        :param reset_dag_runs: set the run back to queued so the scheduler picks it up
        """
        body: dict[str, Any] = {
            "dag_run_id": run_id,
            "dry_run": dry_run,
            "only_failed": only_failed,
            "include_downstream": include_downstream,
            "include_upstream": include_upstream,
            "reset_dag_runs": reset_dag_runs,
        }
        if task_ids is not None:
            ids = list(task_ids)
            body["task_ids"] = (
                [[task_id, index] for task_id in ids for index in map_indexes]
                if map_indexes is not None
                else ids
            )
        return self.post(f"dags/{_q(dag_id)}/clearTaskInstances", body)["task_instances"]

    def xcom(
        self, dag_id: str, run_id: str, task_id: str, map_index: int = -1, key: str = "return_value"
    ) -> Any:
        """
        Return an XCom's value as stored (JSON-decoded).

        :param dag_id: the DAG id
        :param run_id: the run id
        :param task_id: the task id
        :param map_index: the map index (-1 when not mapped)
        :param key: the XCom key
        """
        path = f"dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}/xcomEntries/{_q(key)}"
        return self.get(path, map_index=map_index)["value"]

    # ---------------------------------------------------------------- pools, connections, variables
    def set_pool(
        self, name: str, slots: int, *, include_deferred: bool = False, description: str = ""
    ) -> None:
        """
        Create a pool or change its slots.

        :param name: the pool
        :param slots: its size (-1: unlimited)
        :param include_deferred: whether deferred tasks take a slot
        :param description: its description
        """
        fields = {"slots": slots, "include_deferred": include_deferred, "description": description}
        try:
            self.patch(f"pools/{_q(name)}", {"pool": name, **fields})  # the patch body calls it "pool"
        except StackAPIError as error:
            if error.status_code != 404:
                raise
            self.post("pools", {"name": name, **fields})

    def pool(self, name: str) -> dict[str, Any]:
        """
        Return a pool with its slot usage (``running_slots``, ``deferred_slots``, ...).

        :param name: the pool
        """
        return self.get(f"pools/{_q(name)}")


def _ti_summary(ti: dict[str, Any]) -> tuple[str, int, str, int]:
    return (ti["task_id"], ti["map_index"], str(ti["state"]), ti["try_number"])


def _state_counts(tis: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for ti in tis:
        counts[str(ti["state"])] = counts.get(str(ti["state"]), 0) + 1
    return ", ".join(f"{state}={count}" for state, count in sorted(counts.items())) or "no task instances"


def format_task_instances(tis: list[dict[str, Any]]) -> str:
    """
    Render task instances as a table, one line each.

    :param tis: task instances as the API returns them
    """
    lines = ["task instances:"]
    for ti in tis:
        label = ti["task_id"] + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else "")
        lines.append(
            f"  {label:40} {ti['state']!s:16} try {ti['try_number']}  pid {ti.get('pid')}  "
            f"start {ti.get('start_date')}  end {ti.get('end_date')}"
        )
    return "\n".join(lines)
