"""
Airflow's own resume floor: a trivial deferral that resumes the moment its trigger fires.

Each mapped instance defers to a ``DateTimeTrigger`` due ``delay`` seconds later and returns that
moment when it resumes; the end of the instance minus the moment is what Airflow itself takes to
wake a deferred task (triggerer tick, scheduler loop, executor, task start), with no provider code
in the way. ``python -m benchmarks latency`` runs it beside the callback wake.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.providers.standard.triggers.temporal import DateTimeTrigger
from airflow.sdk import BaseOperator, dag

DAG_ID = "imagecb_resume_floor"


class ResumeAtMoment(BaseOperator):
    """
    Defer until ``delay`` seconds from now; return the moment the trigger fired at (ISO 8601).

    :param delay: seconds until the trigger fires.
    :param index: which instance this is (mapped over, only to make many).
    """

    def __init__(self, *, delay: float, index: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delay = delay
        self.index = index

    def execute(self, context: Any) -> None:
        from airflow.sdk import timezone

        moment = timezone.utcnow() + timedelta(seconds=self.delay)
        self.defer(
            trigger=DateTimeTrigger(moment=moment),
            method_name="resume",
            kwargs={"moment": moment.isoformat()},
        )

    def resume(self, context: Any, event: Any = None, moment: str = "") -> str:
        return datetime.fromisoformat(moment).isoformat()


#: Instances, and the seconds each waits: the callback benchmark's 50 images of 20 s renders.
INSTANCES, DELAY = 50, 20.0


@dag(dag_id=DAG_ID, schedule=None, catchup=False)
def imagecb_resume_floor():
    ResumeAtMoment.partial(task_id="wait", delay=DELAY).expand(index=list(range(INSTANCES)))


imagecb_resume_floor()
