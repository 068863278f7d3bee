"""
Where the provider's pages are, as URLs the Airflow UI accepts.

Importing this module imports neither FastAPI nor the API server: the generate operator's extra
link (computed on the worker when the task ends) builds its URLs here too.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

from imagecb_provider.callbacks.tokens import MOUNT_PREFIX

#: The run page's tab that shows the contact sheet (``.../runs/<run id>/plugin/<route>``).
VIEW_ROUTE = "imagecb-contact-sheet"
#: The tab's title.
VIEW_NAME = "Contact sheet"
#: The anchor of a group's cards on the contact sheet (``#group-3`` for map index 3).
GROUP_ANCHOR = "group-{map_index}"


def ui_base_url() -> str:
    """Return the UI's base URL (``[api] base_url``, no trailing slash); empty when unset."""
    from airflow.configuration import conf

    return (conf.get("api", "base_url", fallback="") or "").rstrip("/")


def ui_root_path() -> str:
    """Return the path the UI is served under (``/airflow`` behind a proxy; usually empty)."""
    return urlsplit(ui_base_url()).path.rstrip("/")


def _q(value: str) -> str:
    return quote(value, safe="")


def run_view_url(dag_id: str, run_id: str, *, map_index: int | None = None) -> str:
    """
    Return the URL of a run's contact sheet tab, optionally anchored at one group.

    :param dag_id: the DAG id
    :param run_id: the run id
    :param map_index: the group (map index of the mapped task group) to scroll to and highlight
    """
    url = f"{ui_base_url()}/dags/{_q(dag_id)}/runs/{_q(run_id)}/plugin/{VIEW_ROUTE}"
    if map_index is not None and map_index >= 0:
        url += "#" + GROUP_ANCHOR.format(map_index=map_index)
    return url


def view_href() -> str:
    """Return the external view's ``href``: the UI fills in ``{DAG_ID}`` and ``{RUN_ID}``."""
    return f"{ui_root_path()}{MOUNT_PREFIX}/dags/{{DAG_ID}}/runs/{{RUN_ID}}/view"
