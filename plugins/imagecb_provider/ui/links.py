"""
Extra links the provider's plugin adds to every task (``global_operator_extra_links``).

The API server computes these when a task instance's page asks for its links, reading the
metadata database; each answers only for a task instance it has something to say about, and an
empty answer is not shown by the UI. Nothing heavy is imported until a link is asked for: the
plugin module is loaded by every Airflow process, task processes included.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperatorLink

from imagecb_provider.links import image_link
from imagecb_provider.ui.urls import run_view_url

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey


def _stored_return_value(ti_key: TaskInstanceKey) -> Any:
    from airflow.utils.session import create_session

    from imagecb_provider.ui.lookup import return_value

    with create_session() as session:
        return return_value(session, ti_key)


class ContactSheetLink(BaseOperatorLink):
    """ "Contact sheet": on the task that wrote a run's report, the run's *Contact sheet* tab."""

    name = "Contact sheet"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        """
        Return the tab's URL for a task that returned ``{"report": ...}``, else an empty string.

        :param operator: the task
        :param ti_key: the task instance
        """
        from imagecb_provider.ui.lookup import REPORT_KEY

        value = _stored_return_value(ti_key)
        if isinstance(value, Mapping) and value.get(REPORT_KEY):
            return run_view_url(ti_key.dag_id, ti_key.run_id)
        return ""


class ArchivedImageLink(BaseOperatorLink):
    """
    "Generated image" on a task without one of its own, such as the archive task.

    An operator's own link of the same name wins (the generate operators have one), so this
    answers for tasks that return image results without declaring the link: one image opens it,
    several open the contact sheet at that group.
    """

    name = "Generated image"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        """
        Return the image (or contact sheet) URL of a task that returned image results.

        :param operator: the task
        :param ti_key: the task instance
        """
        value = _stored_return_value(ti_key)
        return image_link(value, dag_id=ti_key.dag_id, run_id=ti_key.run_id, map_index=ti_key.map_index)


class LostPromptsLink(BaseOperatorLink):
    """
    "Prompts without an image": on every task of a group that lost prompts, why each was lost.

    A group is one map index of a mapped task group (``image``); its results are those of the
    group's generate task. The link opens the contact sheet scrolled to the group, whose red
    cards give each lost prompt's outcome and the vendor's message. It is how a red ``settle``
    (or a failed ``archive``) shows its reason next to where its links would be.
    """

    name = "Prompts without an image"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        """
        Return the contact sheet at this group when its generate task lost a prompt, else "".

        :param operator: the task
        :param ti_key: the task instance
        """
        if ti_key.map_index < 0 or "." not in ti_key.task_id:
            return ""
        from airflow.utils.session import create_session

        from imagecb_provider.ui.lookup import generated_groups

        group_prefix = ti_key.task_id.rsplit(".", 1)[0] + "."
        with create_session() as session:
            groups = generated_groups(
                session, ti_key.dag_id, ti_key.run_id, map_index=ti_key.map_index, prefix=group_prefix
            )
        if any(group.lost for group in groups):
            return run_view_url(ti_key.dag_id, ti_key.run_id, map_index=ti_key.map_index)
        return ""
