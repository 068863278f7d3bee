"""Extra links the imagecb operators add to a task instance in the Airflow UI."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import BaseOperatorLink
from airflow.sdk.execution_time.xcom import XCom

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey


class GeneratedImageLink(BaseOperatorLink):
    """
    "Generated image": the result image of the task, read from its returned result.

    The result URL is the vendor's long-lived copy (kept 14 days); the origin URL expires after
    10 minutes, so it is never linked. Empty while the task has not finished.
    """

    name = "Generated image"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        result = XCom.get_value(ti_key=ti_key, key="return_value")
        if isinstance(result, list) and len(result) == 1:
            result = result[0]
        if isinstance(result, dict):
            return result.get("result_image_url") or ""
        return ""
