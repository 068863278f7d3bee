"""
The provider's documentation, served by the provider itself: ``GET /imagecb/docs``.

The page is the installed distribution's description (this project's README), rendered to HTML.
The Providers page links here (the package's ``Documentation`` URL), and the plugin adds it to
the UI's navigation, so the documentation is where the provider runs, in the version installed.
"""

from __future__ import annotations

import html
from functools import cache
from importlib import metadata

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

DISTRIBUTION = "airflow-provider-imagecb"
DOCS_PATH = "/docs"

router = APIRouter(tags=["imagecb documentation"])

_STYLE = (
    "body{font:15px/1.5 system-ui,sans-serif;max-width:960px;margin:24px auto;padding:0 16px;color:#222}"
    "pre{background:#f5f5f5;padding:10px;overflow:auto}code{background:#f5f5f5}"
    "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 8px}"
)


@cache
def rendered_readme() -> str:
    """The installed distribution's README as an HTML page (read and rendered once per process)."""
    from markdown_it import MarkdownIt

    text = _description()
    body = MarkdownIt("commonmark").enable("table").render(text) if text.strip() else ""
    if not body:
        body = f"<p>{html.escape(DISTRIBUTION)} is not installed as a distribution: see its README.</p>"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>imagecb provider</title>"
        f"<style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def _description() -> str:
    """The README the distribution was built with: its metadata's body, read from the file itself."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return ""
    raw = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    headers, _, body = raw.partition("\n\n")
    return body if headers else ""


@router.get(DOCS_PATH, response_class=HTMLResponse)
def documentation() -> HTMLResponse:
    """Show the provider's README (public: it holds no secret)."""
    return HTMLResponse(rendered_readme(), headers={"X-Content-Type-Options": "nosniff"})
