"""
The provider's one FastAPI app on the Airflow API server, and the UI entries that point at it.

The plugin mounts a single app under ``/imagecb``: the callback receiver
(:mod:`imagecb_provider.callbacks.app`, ``/imagecb/callbacks/...``) with the contact sheet routes
(:mod:`imagecb_provider.ui.router`, ``/imagecb/dags/...``) included. It is built at its first
request, not when the plugin is imported: every Airflow process imports the plugin, each task
process included, and only the API server serves the app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imagecb_provider.ui.urls import VIEW_NAME, VIEW_ROUTE, view_href

if TYPE_CHECKING:
    from collections.abc import Callable

    from fastapi import FastAPI
    from starlette.types import ASGIApp, Receive, Scope, Send


def create_app() -> FastAPI:
    """Build the app: the callback receiver's, with the contact sheet routes added."""
    from imagecb_provider.callbacks.app import create_app as create_callbacks_app
    from imagecb_provider.ui.docs import router as docs_router
    from imagecb_provider.ui.router import router

    app = create_callbacks_app()
    app.title = "imagecb"
    app.include_router(router)
    app.include_router(docs_router)
    return app


class LazyApp:
    """
    An ASGI app that builds the real one at its first request.

    Airflow enters the lifespan of mounted ``FastAPI`` apps only; neither app here has one.

    :param factory: returns the app to serve
    """

    def __init__(self, factory: Callable[[], ASGIApp] = create_app) -> None:
        self.factory = factory
        self._app: ASGIApp | None = None

    @property
    def app(self) -> ASGIApp:
        """The real app (built now if not yet)."""
        if self._app is None:
            self._app = self.factory()
        return self._app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def docs_view() -> dict[str, Any]:
    """Return the external view that adds the provider's documentation to the UI's navigation."""
    from imagecb_provider.callbacks.tokens import MOUNT_PREFIX
    from imagecb_provider.ui.docs import DOCS_PATH

    return {"name": "imagecb docs", "href": f"{MOUNT_PREFIX}{DOCS_PATH}", "destination": "nav"}


def contact_sheet_view() -> dict[str, Any]:
    """Return the external view that adds the *Contact sheet* tab to every DAG run page."""
    return {
        "name": VIEW_NAME,
        "href": view_href(),
        "destination": "dag_run",
        "url_route": VIEW_ROUTE,
    }
