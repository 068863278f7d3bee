"""
The real-stack harness on a real stack: runs on both executors, components killed and
restarted, a task cleared and killed, samplers, the CLI, and the error for an absent service.

Tests sharing a configuration share one running stack (``airflow_stack`` fixture); they are
ordered so the LocalExecutor ones run first, then the Celery ones, and each stack starts once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import psutil
import pytest

from imagecb_dev.stack import (
    AirflowStack,
    Postgres,
    Redis,
    SharedStacks,
    StackAPIError,
    StackError,
    StackUnavailable,
)
from imagecb_dev.stack.environment import free_port

pytestmark = pytest.mark.stack

DEFERRED, MAPPED, SLEEP = "stack_deferred", "stack_mapped", "stack_sleep"


def wait_for_task_state(
    stack: AirflowStack, dag_id: str, run_id: str, task_id: str, state: str, timeout: float = 90
) -> dict[str, Any]:
    """Poll a task instance until it reaches ``state``; fail with the stack's logs otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        ti = stack.client.task_instance(dag_id, run_id, task_id)
        if ti["state"] == state:
            return ti
        if time.monotonic() > deadline:
            pytest.fail(f"{task_id} still {ti['state']!r}, never {state!r}\n{stack.diagnostics()}")
        time.sleep(0.3)


def by_task(stack: AirflowStack, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
    return {ti["task_id"]: ti for ti in stack.client.task_instances(dag_id, run_id)}


def gone(pids: list[int]) -> bool:
    return all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie" for pid in pids)


# --------------------------------------------------------------------------- LocalExecutor
def test_deferred_run_succeeds_on_local_executor(local_stack: AirflowStack) -> None:
    run_id = local_stack.trigger(DEFERRED, {"seconds": 4})
    wait_for_task_state(local_stack, DEFERRED, run_id, "wait", "deferred")

    assert local_stack.wait_for_run(DEFERRED, run_id, timeout=120) == "success"
    tis = by_task(local_stack, DEFERRED, run_id)
    assert {task: ti["state"] for task, ti in tis.items()} == {"wait": "success", "after": "success"}
    assert all(tis["after"][field] for field in ("pid", "hostname", "start_date", "end_date"))
    assert local_stack.client.xcom(DEFERRED, run_id, "after")["after"] == {"deferred_for": 4.0}
    assert local_stack.task_log(DEFERRED, run_id, "wait")  # written to the stack's task log folder


def test_login_uses_the_harness_password(local_stack: AirflowStack) -> None:
    assert local_stack.client.token(refresh=True)
    response = httpx.post(
        f"{local_stack.url}/auth/token", json={"username": local_stack.username, "password": "wrong"}
    )
    assert response.status_code == 401
    assert local_stack.client.get("pools/imagecb_submissions")["slots"] == 1
    assert local_stack.client.get("pools/imagecb_submissions")["include_deferred"] is False


def test_mapped_task_instances_xcoms_and_tries(local_stack: AirflowStack) -> None:
    client = local_stack.client
    run_id, state = local_stack.run(MAPPED, {"count": 3}, timeout=120)

    assert state == "success"
    squares = [ti for ti in client.task_instances(MAPPED, run_id, page_size=2) if ti["task_id"] == "square"]
    assert [(ti["map_index"], ti["rendered_map_index"]) for ti in squares] == [
        (0, "item-0"),
        (1, "item-1"),
        (2, "item-2"),
    ]
    assert [client.xcom(MAPPED, run_id, "square", index) for index in range(3)] == [0, 1, 4]
    assert [t["try_number"] for t in client.tries(MAPPED, run_id, "square", 1)] == [1]


def test_clearing_a_mapped_task_reruns_only_that_index(local_stack: AirflowStack) -> None:
    client = local_stack.client
    run_id, state = local_stack.run(MAPPED, {"count": 2}, timeout=120)
    assert state == "success"

    cleared = client.clear(MAPPED, run_id, ["square"], map_indexes=[1])

    assert [(ti["task_id"], ti["map_index"]) for ti in cleared] == [("square", 1)]
    assert local_stack.wait_for_run(MAPPED, run_id, timeout=120) == "success"
    assert [t["try_number"] for t in client.tries(MAPPED, run_id, "square", 1)] == [1, 2]
    assert [t["try_number"] for t in client.tries(MAPPED, run_id, "square", 0)] == [1]


def test_triggerer_killed_while_deferred_then_restarted(local_stack: AirflowStack) -> None:
    run_id = local_stack.trigger(DEFERRED, {"seconds": 15})
    wait_for_task_state(local_stack, DEFERRED, run_id, "wait", "deferred")
    old_pid = local_stack.pid("triggerer")

    killed = local_stack.kill("triggerer", signal.SIGKILL)

    assert not local_stack.alive("triggerer")
    assert len(killed) >= 2  # the triggerer and its trigger-runner subprocess (and log server)
    assert gone(killed)
    local_stack.start_component("triggerer")
    assert local_stack.pid("triggerer") not in (None, old_pid)
    assert local_stack.wait_for_run(DEFERRED, run_id, timeout=180) == "success"


def test_scheduler_killed_mid_run_then_restarted(local_stack: AirflowStack) -> None:
    run_id = local_stack.trigger(DEFERRED, {"seconds": 8})
    wait_for_task_state(local_stack, DEFERRED, run_id, "wait", "deferred")

    killed = local_stack.kill("scheduler", signal.SIGKILL)  # its LocalExecutor workers go too

    assert gone(killed)
    assert local_stack.client.dag_run(DEFERRED, run_id)["state"] == "running"
    local_stack.start_component("scheduler")
    assert local_stack.wait_for_run(DEFERRED, run_id, timeout=180) == "success"


def test_killing_a_running_task_process_fails_the_task(local_stack: AirflowStack) -> None:
    run_id = local_stack.trigger(SLEEP, {"seconds": 300})
    running = local_stack.task_pid(SLEEP, run_id, "sleep")
    assert running in [p.pid for p in local_stack.processes("scheduler")]  # LocalExecutor worker's child

    pid = local_stack.kill_task(SLEEP, run_id, "sleep")

    assert pid == running
    assert gone([pid])
    assert local_stack.wait_for_run(SLEEP, run_id, timeout=120) == "failed"
    ti = local_stack.client.task_instance(SLEEP, run_id, "sleep")
    assert (ti["state"], ti["pid"]) == ("failed", pid)
    assert local_stack.alive("scheduler")


def test_samplers_report_triggerer_memory_and_busy_slots(local_stack: AirflowStack) -> None:
    with local_stack.sample("triggerer", interval=0.2) as triggerer, local_stack.sample_slots(0.5) as slots:
        deferred_run = local_stack.trigger(DEFERRED, {"seconds": 3})
        sleep_run = local_stack.trigger(SLEEP, {"seconds": 4})
        assert local_stack.wait_for_run(DEFERRED, deferred_run, timeout=120) == "success"
        assert local_stack.wait_for_run(SLEEP, sleep_run, timeout=120) == "success"

    stats = triggerer.stats
    print("triggerer:", stats.as_dict(), "slots:", slots.as_dict())
    assert stats.peak_rss_mb > 50
    assert stats.cpu_seconds > 0
    assert stats.peak_processes >= 2
    assert slots.peak_running >= 1
    assert slots.peak_deferred >= 1
    assert triggerer.errors + slots.errors == []


def test_api_errors_carry_the_status_and_detail(local_stack: AirflowStack) -> None:
    with pytest.raises(StackAPIError) as raised:
        local_stack.client.dag("no_such_dag")
    assert raised.value.status_code == 404


def test_unknown_component_is_named(local_stack: AirflowStack) -> None:
    with pytest.raises(KeyError, match="this stack runs api-server, scheduler"):
        local_stack.kill("webserver")


def test_stack_errors_name_the_component_that_died(local_stack: AirflowStack) -> None:
    local_stack.kill("dag-processor")
    with pytest.raises(StackError, match="dag-processor exited"):
        local_stack.wait_ready(["dag-processor"], timeout=5)
    local_stack.ensure_healthy()
    assert local_stack.alive("dag-processor")


# --------------------------------------------------------------------------- CeleryExecutor
def test_deferred_run_succeeds_on_celery_executor(celery_stack: AirflowStack) -> None:
    run_id = celery_stack.trigger(DEFERRED, {"seconds": 4})
    wait_for_task_state(celery_stack, DEFERRED, run_id, "wait", "deferred")

    assert celery_stack.wait_for_run(DEFERRED, run_id, timeout=120) == "success"
    assert celery_stack.client.xcom(DEFERRED, run_id, "after")["after"] == {"deferred_for": 4.0}
    worker_log = celery_stack.components["celery-worker"].log_since_start()
    assert "execute_workload" in worker_log  # the tasks went through Celery


def test_killing_a_running_task_process_on_celery(celery_stack: AirflowStack) -> None:
    run_id = celery_stack.trigger(SLEEP, {"seconds": 300})
    running = celery_stack.task_pid(SLEEP, run_id, "sleep")
    assert running in [p.pid for p in celery_stack.processes("celery-worker")]

    pid = celery_stack.kill_task(SLEEP, run_id, "sleep")

    assert pid == running
    assert gone([pid])
    assert celery_stack.wait_for_run(SLEEP, run_id, timeout=120) == "failed"
    assert celery_stack.client.task_instance(SLEEP, run_id, "sleep")["pid"] == pid
    assert celery_stack.alive("celery-worker")


# --------------------------------------------------------------------------- no stack needed
def test_absent_postgres_fails_fast_with_how_to_start_it() -> None:
    port = free_port()
    began = time.monotonic()

    with pytest.raises(StackUnavailable) as raised:
        AirflowStack(postgres=Postgres(port=port)).start()

    message = str(raised.value)
    print(f"failed in {time.monotonic() - began:.2f}s:\n{message}")
    assert f"PostgreSQL does not answer on 127.0.0.1:{port}" in message
    assert "pg_ctlcluster --skip-systemctl-redirect" in message


def test_absent_redis_fails_a_celery_stack_with_how_to_start_it() -> None:
    port = free_port()

    with pytest.raises(StackUnavailable) as raised:
        AirflowStack(executor="CeleryExecutor", redis=Redis(port=port)).start()

    assert f"Redis does not answer on 127.0.0.1:{port}" in str(raised.value)
    assert "redis-server --daemonize yes" in str(raised.value)


def test_cli_up_prints_login_and_cleans_up_on_ctrl_c(airflow_stacks: SharedStacks) -> None:
    airflow_stacks.stop_all()  # this test starts its own stack: give it the machine
    command = [sys.executable, "-m", "imagecb_dev.stack", "up", "--parallelism", "2", "--json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            info = json.loads(line)
            token = httpx.post(
                f"{info['url']}/auth/token", json={"username": "admin", "password": info["password"]}
            )
            assert token.status_code == 201
            pids = [pid for pid in info["pids"].values() if pid]
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    assert proc.returncode == 0
    assert gone(pids)
    assert info["database"] not in Postgres().stack_databases()
