"""
The Airflow plugin of the provider, found through the ``airflow.plugins`` entry point of the distribution.

* ``fastapi_apps``: one app under ``/imagecb`` on the API server: the callback receiver
  (``/imagecb/callbacks/...``) and the runs' contact sheets (``/imagecb/dags/...``), the latter
  behind Airflow's authentication (see :mod:`imagecb_provider.ui.router`);
* ``external_views``: the *Contact sheet* tab of every DAG run page, and *imagecb docs* in the
  navigation (the provider's README, :mod:`imagecb_provider.ui.docs`);
* ``fastapi_root_middlewares``: callback tokens taken out of every request path before the API
  server's access log prints it, also for paths that never reach the ``/imagecb`` mount
  (``//imagecb/callbacks/<token>``);
* ``global_operator_extra_links``: *Contact sheet* (on the task that wrote the report),
  *Generated image* (on tasks that return images without a link of their own, such as the
  archive task) and *Prompts without an image* (on every task of a group that lost a prompt).

The generate operators' own *Generated image* link needs no registration: Airflow 3 computes an
operator's links on the worker when the task ends and stores them as XComs.
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

from imagecb_provider.callbacks.tokens import MOUNT_PREFIX
from imagecb_provider.ui.app import LazyApp, contact_sheet_view, docs_view
from imagecb_provider.ui.links import ArchivedImageLink, ContactSheetLink, LostPromptsLink


def redact_callback_tokens(app: Any, prefix: str) -> Any:
    """
    Wrap the API server in :class:`~imagecb_provider.callbacks.app.RedactCallbackTokens`.

    :param app: the API server's application.
    :param prefix: where the receiver is mounted.
    """
    from imagecb_provider.callbacks.app import RedactCallbackTokens  # fastapi only on the API server

    return RedactCallbackTokens(app, prefix=prefix)


class ImageCbPlugin(AirflowPlugin):
    """The imagecb plugin: the API server app, the run tab and the global extra links."""

    name = "imagecb"
    fastapi_apps = [{"name": "imagecb", "app": LazyApp(), "url_prefix": MOUNT_PREFIX}]
    fastapi_root_middlewares = [
        {
            "name": "imagecb callback token redaction",
            "middleware": redact_callback_tokens,
            "kwargs": {"prefix": MOUNT_PREFIX},
        }
    ]
    external_views = [contact_sheet_view(), docs_view()]
    global_operator_extra_links = [ContactSheetLink(), ArchivedImageLink(), LostPromptsLink()]
