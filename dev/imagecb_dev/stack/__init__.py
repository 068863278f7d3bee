"""
A real Airflow deployment for tests, benchmarks and ``make airflow``.

:class:`AirflowStack` runs ``airflow api-server``, ``scheduler``, ``dag-processor`` and
``triggerer`` (and ``celery worker`` with the CeleryExecutor) as separate processes on a
PostgreSQL database of its own, with a REST client, process control for fault injection,
resource samplers and log access. See ``dev/README.md``.

Importing this package does not import Airflow: the harness talks to the stack only through
processes, PostgreSQL, Redis and HTTP.
"""

from __future__ import annotations

from imagecb_dev.stack.client import AirflowClient
from imagecb_dev.stack.core import CELERY_WORKER, CORE_COMPONENTS, AirflowStack, running_stacks
from imagecb_dev.stack.errors import RunTimeout, StackAPIError, StackError, StackUnavailable
from imagecb_dev.stack.sampler import SlotSampler, TreeSampler, TreeStats
from imagecb_dev.stack.services import Postgres, Redis
from imagecb_dev.stack.shared import SharedStacks

__all__ = [
    "CELERY_WORKER",
    "CORE_COMPONENTS",
    "AirflowClient",
    "AirflowStack",
    "Postgres",
    "Redis",
    "RunTimeout",
    "SharedStacks",
    "SlotSampler",
    "StackAPIError",
    "StackError",
    "StackUnavailable",
    "TreeSampler",
    "TreeStats",
    "running_stacks",
]
