"""
pytest fixtures that start the image API simulator on a free port, and real Airflow stacks.

Load with ``-p imagecb_provider.testing.pytest_plugin`` or ``pytest_plugins = [...]``. The
simulator is imported inside the fixtures, so merely loading the plugin costs nothing and works
without the simulator's extra dependencies installed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from imagecb_provider.testing.simulator import RunningSimulator
    from imagecb_provider.testing.stack import AirflowStack, SharedStacks

CONN_ENV = "AIRFLOW_CONN_IMAGECB_DEFAULT"


@pytest.fixture
def imagecb_simulator_factory() -> Iterator[Callable[..., RunningSimulator]]:
    """``start(**config_fields)`` starts an in-thread simulator; all are stopped after the test."""
    from imagecb_provider.testing.simulator import run_in_thread

    with ExitStack() as stack:

        def start(**config_fields: Any) -> RunningSimulator:
            return stack.enter_context(run_in_thread(**config_fields))

        yield start


@pytest.fixture
def imagecb_simulator(
    imagecb_simulator_factory: Callable[..., RunningSimulator], monkeypatch: pytest.MonkeyPatch
) -> RunningSimulator:
    """A fast simulator (latency 0.2 s) that ``imagecb_default`` points at for this test."""
    simulator = imagecb_simulator_factory(latency=0.2)
    monkeypatch.setenv(CONN_ENV, simulator.connection_json())
    return simulator


# ---------------------------------------------------------------------------------------------
# The real Airflow stack (imagecb_provider.testing.stack): separate API server, scheduler,
# DAG processor, triggerer (and Celery worker) processes on the local PostgreSQL.

#: How many stacks of different configurations may run at once in a session (default 1).
MAX_STACKS_ENV = "IMAGECB_STACK_MAX_RUNNING"


@pytest.fixture(scope="session")
def airflow_stacks() -> Iterator[SharedStacks]:
    """
    Real Airflow stacks for the whole session, one per configuration: ``airflow_stacks.get(**options)``.

    A stack costs 10-20 s to start, so tests asking for the same options share one. Asking for
    other options stops the least recently used stack first when ``IMAGECB_STACK_MAX_RUNNING``
    (default 1) are running. Every stack is stopped, and its database dropped, at session end.
    An absent PostgreSQL or Redis raises ``StackUnavailable``: the test fails, it never skips.
    """
    import os

    from imagecb_provider.testing.stack import SharedStacks

    stacks = SharedStacks(max_running=int(os.environ.get(MAX_STACKS_ENV, "1")))
    try:
        yield stacks
    finally:
        stacks.stop_all()


@pytest.fixture
def airflow_stack(airflow_stacks: SharedStacks) -> Iterator[Callable[..., AirflowStack]]:
    """
    ``airflow_stack(executor="LocalExecutor", **options)`` returns a running ``AirflowStack``.

    The stack is shared with the other tests asking for the same options (see
    ``airflow_stacks``); ``private=True`` starts one for this test alone, stopped after it.
    ``dag_ids=[...]`` waits until those DAGs are parsed and unpauses them.
    """
    from imagecb_provider.testing.stack import AirflowStack

    private_stacks: list[AirflowStack] = []

    def get(*, private: bool = False, **options: Any) -> AirflowStack:
        if not private:
            return airflow_stacks.get(**options)
        stack = AirflowStack(**options)
        private_stacks.append(stack)
        return stack.start()

    try:
        yield get
    finally:
        for stack in private_stacks:
            stack.stop()
