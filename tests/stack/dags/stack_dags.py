"""
Tiny DAGs for the real-stack harness tests (``tests/stack/test_stack.py``).

- ``stack_deferred``: ``wait`` defers to the triggerer for ``params.seconds``, then ``after``
  runs on a worker with its result.
- ``stack_mapped``: ``square`` mapped over ``params.count`` items, labelled ``item-<n>``.
- ``stack_sleep``: one task that sleeps ``params.seconds`` in its own process (to be killed).
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
from airflow.sdk import DAG, BaseOperator, get_current_context, task

# A trigger that fires within a fraction of a second of the deferral races the executor
# (upstream apache/airflow#72716): the task may be failed once and retried. Keep a retry.
RETRIES = {"retries": 2, "retry_delay": timedelta(seconds=1)}


class DeferFor(BaseOperator):
    """
    Defer to the triggerer for some seconds, then return how long.

    :param seconds: how long to wait in the triggerer (templated)
    """

    template_fields = ("seconds",)

    def __init__(self, *, seconds: float | str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds = seconds

    def execute(self, context: Any) -> None:
        self.defer(trigger=TimeDeltaTrigger(timedelta(seconds=float(self.seconds))), method_name="resume")

    def resume(self, context: Any, event: Any = None) -> dict[str, float]:
        return {"deferred_for": float(self.seconds)}


with DAG("stack_deferred", schedule=None, params={"seconds": 3}, default_args=RETRIES, tags=["stack"]):

    @task
    def after(result: dict[str, float]) -> dict[str, Any]:
        return {"after": result, "finished": time.time()}

    after(DeferFor(task_id="wait", seconds="{{ params.seconds }}").output)


with DAG("stack_mapped", schedule=None, params={"count": 3}, default_args=RETRIES, tags=["stack"]):

    @task
    def items(params: dict[str, Any] | None = None) -> list[int]:
        return list(range(int((params or {})["count"])))

    @task(map_index_template="{{ label }}")
    def square(item: int) -> int:
        get_current_context()["label"] = f"item-{item}"  # type: ignore[typeddict-unknown-key]
        return item * item

    square.expand(item=items())


with DAG("stack_sleep", schedule=None, params={"seconds": 120}, tags=["stack"]):

    @task(retries=0)
    def sleep(params: dict[str, Any] | None = None) -> None:
        time.sleep(float((params or {})["seconds"]))

    sleep()
