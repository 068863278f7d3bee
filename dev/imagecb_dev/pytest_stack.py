"""
pytest fixtures for real Airflow stacks (:mod:`imagecb_dev.stack`): separate API server, scheduler,
DAG processor, triggerer (and Celery worker) processes on the local PostgreSQL.

Loaded with ``-p imagecb_dev.pytest_stack`` (the project's pytest settings do). Nothing is
imported until a test asks for a stack.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from imagecb_dev.stack import AirflowStack, SharedStacks

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
    from imagecb_dev.stack import SharedStacks

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
    from imagecb_dev.stack import AirflowStack

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
