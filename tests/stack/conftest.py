"""
Real-stack tests: the ``stack`` marker, the stacks they share, and a wall-time table at the end.

They need PostgreSQL on 127.0.0.1:5432 and, for Celery, Redis on 127.0.0.1:6379. When one
does not answer, the tests fail with ``StackUnavailable`` saying how to start it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from imagecb_dev.stack import AirflowStack
    from imagecb_provider.testing.simulator import RunningSimulator

DAGS = Path(__file__).resolve().parent / "dags"
DAG_IDS = ("stack_deferred", "stack_mapped", "stack_sleep")
#: Small stacks: the tests run a handful of tasks at a time.
PARALLELISM = 4
_WALL_TIMES: list[tuple[str, float, str]] = []
_STACKS: dict[int, AirflowStack] = {}


@pytest.fixture(autouse=True)
def _wall_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """Time each test, stack start-up included, for the table printed at the end."""
    began = time.monotonic()
    yield
    outcome = "passed"
    report = getattr(request.node, "_stack_call_report", None)
    if report is not None and not report.passed:
        outcome = report.outcome
    _WALL_TIMES.append((request.node.nodeid, time.monotonic() - began, outcome))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    report = yield
    if report.when == "call":
        item._stack_call_report = report  # type: ignore[attr-defined]
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _WALL_TIMES:
        return
    terminalreporter.section("real-stack tests: wall time (stack start-up counted in the first user)")
    for nodeid, seconds, outcome in _WALL_TIMES:
        terminalreporter.write_line(f"{seconds:7.1f}s  {outcome:7}  {nodeid}")
    terminalreporter.write_line(f"{sum(s for _, s, _ in _WALL_TIMES):7.1f}s  total")
    for stack in _STACKS.values():
        terminalreporter.write_line(f"{stack.executor} stack: {stack.timings}")


def _shared_stack(airflow_stack: Callable[..., AirflowStack], executor: str) -> AirflowStack:
    stack = airflow_stack(executor=executor, dags_folder=DAGS, parallelism=PARALLELISM, dag_ids=DAG_IDS)
    _STACKS[id(stack)] = stack
    return stack


@pytest.fixture
def local_stack(airflow_stack: Callable[..., AirflowStack]) -> AirflowStack:
    """The shared LocalExecutor stack running this folder's DAGs."""
    return _shared_stack(airflow_stack, "LocalExecutor")


@pytest.fixture
def celery_stack(airflow_stack: Callable[..., AirflowStack]) -> AirflowStack:
    """The shared CeleryExecutor stack running this folder's DAGs."""
    return _shared_stack(airflow_stack, "CeleryExecutor")


# ---------------------------------------------------------------------------------------------
# The batch DAG on a real stack (test_batch_dag.py, test_faults.py): one simulator for the
# session, one stack per executor wired to it, the LocalExecutor cases first.
_BATCH_FILES = ("test_batch_dag.py", "test_faults.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """
    Run the batch tests of both files in one block, by executor (Local, then Celery), where the
    first of them was collected: each of their two stacks starts once.
    """
    batch = [item for item in items if item.path.name in _BATCH_FILES]
    if not batch:
        return
    first = items.index(batch[0])
    rest = [item for item in items if item.path.name not in _BATCH_FILES]
    ordered = sorted(batch, key=lambda item: "celery" in item.name)
    items[:] = rest[:first] + ordered + rest[first:]


@pytest.fixture(scope="session")
def batch_simulator() -> Iterator[RunningSimulator]:
    """The image API simulator (its own process) every batch stack's connections point at."""
    from batch_checks import SIMULATOR_FIELDS

    from imagecb_provider.testing.simulator import run_in_subprocess

    with run_in_subprocess(**SIMULATOR_FIELDS) as simulator:
        yield simulator


def _batch_stack(
    airflow_stack: Callable[..., AirflowStack], simulator: RunningSimulator, executor: str
) -> Iterator[AirflowStack]:
    from batch_checks import DAG_ID, end_leftover_runs, stack_options

    stack = airflow_stack(**stack_options(simulator, executor), dag_ids=[DAG_ID])
    _STACKS[id(stack)] = stack
    yield stack
    end_leftover_runs(stack)


@pytest.fixture
def batch_local_stack(
    airflow_stack: Callable[..., AirflowStack], batch_simulator: RunningSimulator
) -> Iterator[AirflowStack]:
    """The shared LocalExecutor stack running the project's DAGs against ``batch_simulator``."""
    yield from _batch_stack(airflow_stack, batch_simulator, "LocalExecutor")


@pytest.fixture
def batch_celery_stack(
    airflow_stack: Callable[..., AirflowStack], batch_simulator: RunningSimulator
) -> Iterator[AirflowStack]:
    """The shared CeleryExecutor stack running the project's DAGs against ``batch_simulator``."""
    yield from _batch_stack(airflow_stack, batch_simulator, "CeleryExecutor")
