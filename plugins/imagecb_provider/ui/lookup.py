"""
Read what the contact sheet and the extra links need from Airflow's metadata database.

Runs on the API server (the plugin's app and its global extra links), where XComs are rows of
the ``xcom`` table, not the task SDK's XCom client. Values are decoded as plain JSON: nothing a
task stored is ever turned back into an object.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

if TYPE_CHECKING:
    from airflow.models.taskinstancekey import TaskInstanceKey
    from sqlalchemy.orm import Session

RETURN_KEY = "return_value"
#: The key, in the report task's returned dict, of the contact sheet's path or URL.
REPORT_KEY = "report"
#: The operators whose instances make images (the ``operator`` column of a task instance).
GENERATE_OPERATORS = ("ImageBatchGenerateOperator", "ImageGenerateOperator")
SUCCESS = "success"


def decode(value: Any) -> Any:
    """
    Return a stored XCom value as plain JSON data.

    :param value: the ``xcom.value`` column: JSON text, or data already decoded by the driver
    """
    if isinstance(value, str | bytes):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def return_value(session: Session, ti_key: TaskInstanceKey) -> Any:
    """
    Return what a task instance returned (``None`` when it returned nothing, or not yet).

    :param session: a metadata database session
    :param ti_key: the task instance
    """
    from airflow.models.xcom import XComModel

    stored = session.scalar(
        select(XComModel.value).where(
            XComModel.dag_id == ti_key.dag_id,
            XComModel.run_id == ti_key.run_id,
            XComModel.task_id == ti_key.task_id,
            XComModel.map_index == ti_key.map_index,
            XComModel.key == RETURN_KEY,
        )
    )
    return decode(stored)


def run_exists(session: Session, dag_id: str, run_id: str) -> bool:
    """
    Tell whether a DAG run exists.

    :param session: a metadata database session
    :param dag_id: the DAG id
    :param run_id: the run id
    """
    from airflow.models.dagrun import DagRun

    found = session.scalar(select(DagRun.id).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
    return found is not None


def find_report(session: Session, dag_id: str, run_id: str) -> str | None:
    """
    Return the path or URL of a run's contact sheet, from the XCom of the task that wrote it.

    That is the unmapped task whose return value is a dict with a ``report`` key (the batch DAG's
    ``report`` task returns ``{"summary": path, "report": path}``).

    :param session: a metadata database session
    :param dag_id: the DAG id
    :param run_id: the run id
    """
    from airflow.models.xcom import XComModel

    rows = session.execute(
        select(XComModel.task_id, XComModel.value)
        .where(
            XComModel.dag_id == dag_id,
            XComModel.run_id == run_id,
            XComModel.map_index == -1,
            XComModel.key == RETURN_KEY,
        )
        .order_by(XComModel.timestamp.desc())
    )
    for _task_id, stored in rows:
        value = decode(stored)
        if isinstance(value, Mapping) and isinstance(value.get(REPORT_KEY), str) and value[REPORT_KEY]:
            return value[REPORT_KEY]
    return None


@dataclass
class Group:
    """
    One generate task instance of a run and the results it returned so far.

    :param task_id: the task id (``image.generate``)
    :param map_index: its map index (-1 when not mapped)
    :param label: its rendered map index (what it works on), if any
    :param state: its state (``None`` before it is scheduled)
    :param results: its result dicts (empty until it returns)
    """

    task_id: str
    map_index: int
    label: str | None
    state: str | None
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def lost(self) -> list[dict[str, Any]]:
        """The results that ended without an image."""
        return [r for r in self.results if r.get("outcome") != SUCCESS]


def _results(value: Any) -> list[dict[str, Any]]:
    """Return the result dicts in a generate task's return value (one dict or a list)."""
    items = [value] if isinstance(value, Mapping) else value if isinstance(value, list) else []
    return [dict(item) for item in items if isinstance(item, Mapping)]


def generated_groups(
    session: Session, dag_id: str, run_id: str, *, map_index: int | None = None, prefix: str = ""
) -> list[Group]:
    """
    Return a run's generate task instances with their results, by task id and map index.

    :param session: a metadata database session
    :param dag_id: the DAG id
    :param run_id: the run id
    :param map_index: only this map index
    :param prefix: only task ids starting with this (a task group's ``image.``)
    """
    from airflow.models.taskinstance import TaskInstance as TI
    from airflow.models.xcom import XComModel

    query = select(TI.task_id, TI.map_index, TI.rendered_map_index, TI.state).where(
        TI.dag_id == dag_id, TI.run_id == run_id, TI.operator.in_(GENERATE_OPERATORS)
    )
    if map_index is not None:
        query = query.where(TI.map_index == map_index)
    if prefix:
        query = query.where(TI.task_id.startswith(prefix, autoescape=True))
    groups = {
        (row.task_id, row.map_index): Group(
            row.task_id, row.map_index, row.rendered_map_index, getattr(row.state, "value", row.state)
        )
        for row in session.execute(query.order_by(TI.task_id, TI.map_index))
    }
    if not groups:
        return []
    values = session.execute(
        select(XComModel.task_id, XComModel.map_index, XComModel.value).where(
            XComModel.dag_id == dag_id,
            XComModel.run_id == run_id,
            XComModel.key == RETURN_KEY,
            XComModel.task_id.in_({task_id for task_id, _ in groups}),
        )
    )
    for task_id, index, stored in values:
        if (task_id, index) in groups:
            groups[(task_id, index)].results = _results(decode(stored))
    return list(groups.values())
