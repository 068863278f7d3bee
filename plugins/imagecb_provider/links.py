"""
Extra links the imagecb operators add to a task instance in the Airflow UI.

An operator's links are computed on the worker when the task ends (Airflow 3 stores each as an
XCom, ``_link_<class name>``, that the API server reads back); the links the provider's plugin
adds to every task are computed on the API server: see :mod:`imagecb_provider.ui.links`. Both
decide what to show with :func:`image_link`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperatorLink, TaskInstanceState
from airflow.sdk.execution_time.xcom import XCom

from imagecb_provider.ui.urls import run_view_url

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey


def result_images(value: Any) -> list[str]:
    """
    Return the result image URLs in what a generate (or archive) task returned, in order.

    :param value: one result dict, a list of them (``None`` items allowed), or anything else
    """
    results = [value] if isinstance(value, Mapping) else value if isinstance(value, list) else []
    urls = []
    for result in results:
        url = result.get("result_image_url") if isinstance(result, Mapping) else None
        if isinstance(url, str) and url.startswith(("https://", "http://")):
            urls.append(url)
    return urls


def image_link(value: Any, *, dag_id: str, run_id: str, map_index: int) -> str:
    """
    Return the "Generated image" URL of a task instance that returned ``value``.

    One image: the image itself (the vendor's long-lived result URL; the origin URL expires after
    10 minutes, so it is never linked). Several: the run's contact sheet, scrolled to this group.
    None (not finished, or no prompt succeeded): an empty string, which the UI does not show.

    :param value: the task instance's return value
    :param dag_id: its DAG id
    :param run_id: its run id
    :param map_index: its map index (-1 when not mapped)
    """
    images = result_images(value)
    if len(images) == 1:
        return images[0]
    if images:
        return run_view_url(dag_id, run_id, map_index=map_index)
    return ""


class GeneratedImageLink(BaseOperatorLink):
    """
    "Generated image": the image a task made, or for a group of several, the contact sheet at that group.

    Declared by the generate operators; computed on the worker when the task ends, from its
    returned result(s) (see :func:`image_link`).
    """

    name = "Generated image"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        """
        Return the link of one task instance (empty when it has no image).

        :param operator: the task
        :param ti_key: the task instance
        """
        # At the end of a task Airflow passes the running task instance itself: a task that
        # deferred or failed has returned nothing, and asking would log a "not found" error.
        state = getattr(ti_key, "state", None)
        if state is not None and state != TaskInstanceState.SUCCESS:
            return ""
        value = XCom.get_value(ti_key=ti_key, key="return_value")
        return image_link(value, dag_id=ti_key.dag_id, run_id=ti_key.run_id, map_index=ti_key.map_index)
