"""
The contact sheet of a DAG run, served on the Airflow API server behind Airflow's authentication.

Routes (under ``/imagecb`` once mounted by the plugin):

* ``GET /dags/{dag_id}/runs/{run_id}/view``: the run page's *Contact sheet* tab. It redirects to
  the report (``files/runs/<run folder>/report.html``) once the run's report task has returned
  its path; until then it shows the generate tasks' results so far.
* ``GET /dags/{dag_id}/runs/{run_id}/files/{path}``: the report and the images it links
  (``files/images/<file>``), and nothing else (see :mod:`imagecb_provider.ui.files`).

The report's location is whatever a task returned: it is read only under the archive roots an
administrator configured (``[imagecb] archive_roots``, see :mod:`imagecb_provider.ui.roots`),
never over http(s); a location elsewhere, or no root configured, is answered 403 with a page
naming the setting. Files are streamed, and refused (413) past a size cap.

Airflow does not authenticate plugin apps: every route depends on Airflow's own
``requires_access_dag("GET", DagAccessEntity.XCOM)``. Its user comes, as for the UI's own API
calls, from the ``Authorization: Bearer`` header or else the ``_token`` cookie that the login
page sets (path ``/``, so the browser sends it with the tab's iframe and image requests; the
API server's ``JWTRefreshMiddleware`` validates and refreshes it first). No user: 401; a user
who may not read this DAG's task results: 403; then an unknown run or file: 404.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated
from urllib.parse import quote

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import requires_access_dag
from fastapi import APIRouter, Depends, HTTPException, Path, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from imagecb_provider.ui import lookup, pages
from imagecb_provider.ui.files import (
    REPORT_NAME,
    FileRefused,
    FileTooLarge,
    RunFiles,
    is_file,
    max_bytes,
    open_capped,
    read_all,
)
from imagecb_provider.ui.roots import LocationRefused, configured_roots
from imagecb_provider.ui.urls import ui_base_url

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)
router = APIRouter(prefix="/dags/{dag_id}/runs/{run_id}", tags=["imagecb contact sheet"])

#: Who may see a run's contact sheet: whoever may read the DAG's XComs (the results it shows).
CanReadResults = Depends(requires_access_dag("GET", DagAccessEntity.XCOM))
DagId = Annotated[str, Path(min_length=1, max_length=250)]
RunId = Annotated[str, Path(min_length=1, max_length=250)]

_PRIVATE = {"Cache-Control": "private, no-cache", "X-Content-Type-Options": "nosniff"}


def _page_headers(nonce: str) -> dict[str, str]:
    """Return the headers of an HTML page whose one script carries ``nonce``."""
    return _PRIVATE | {"Content-Security-Policy": pages.content_security_policy(nonce)}


def _notice(status_code: int, title: str, text: str) -> HTMLResponse:
    """
    Return a page that says why something is not served.

    :param status_code: the answer's status
    :param title: the page's heading
    :param text: why
    """
    nonce = pages.new_nonce()
    return HTMLResponse(pages.notice_page(title, text), status_code, headers=_page_headers(nonce))


def _report(session: Session, dag_id: str, run_id: str) -> str:
    """
    Return the location of the run's report, or answer 404 when the run or its report is unknown.

    :param session: a metadata database session
    :param dag_id: the DAG id
    :param run_id: the run id
    """
    if not lookup.run_exists(session, dag_id, run_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "DAG run not found")
    report = lookup.find_report(session, dag_id, run_id)
    if report is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "This run has no contact sheet")
    return report


@router.get("/view", dependencies=[CanReadResults], response_class=HTMLResponse)
def run_view(dag_id: DagId, run_id: RunId, session: SessionDep) -> Response:
    """
    Show a run's contact sheet: the report once written, the results so far before.

    A report outside the archive roots is not opened: the results so far are shown (403) with
    why, and the setting that would allow it.

    :param dag_id: the DAG id
    :param run_id: the run id
    :param session: a metadata database session
    """
    if not lookup.run_exists(session, dag_id, run_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "DAG run not found")
    report = lookup.find_report(session, dag_id, run_id)
    notice = ""
    if report is not None:
        try:
            files = RunFiles(report, configured_roots())
            path, _ = files.resolve(files.report_url_path)
            if is_file(path):
                # Relative, so it works whatever the API server's base path is.
                location = "files/" + quote(files.report_url_path)
                return RedirectResponse(location, status.HTTP_307_TEMPORARY_REDIRECT)
        except LocationRefused as refused:
            notice = f"This run's report is not shown. {refused}"
        except FileRefused:
            pass
    nonce = pages.new_nonce()
    groups = lookup.generated_groups(session, dag_id, run_id)
    page = pages.live_sheet(
        dag_id=dag_id, run_id=run_id, groups=groups, ui_url=ui_base_url(), nonce=nonce, notice=notice
    )
    code = status.HTTP_403_FORBIDDEN if notice else status.HTTP_200_OK
    return HTMLResponse(page, code, headers=_page_headers(nonce))


@router.get("/files/{path:path}", dependencies=[CanReadResults])
def run_file(dag_id: DagId, run_id: RunId, path: str, session: SessionDep) -> Response:
    """
    Serve the run's report, its summary, or one image of its day folder (404 for anything else).

    Answers 403 for a report outside the archive roots (or none configured), 413 for a file over
    its size cap; an image is streamed, never read whole.

    :param dag_id: the DAG id
    :param run_id: the run id
    :param path: ``images/<file>`` or ``runs/<run folder>/report.html`` (or ``summary.json``)
    :param session: a metadata database session
    """
    report = _report(session, dag_id, run_id)
    try:
        target, content_type = RunFiles(report, configured_roots()).resolve(path)
        if not is_file(target):
            raise FileRefused(f"no file at {target.url!r}")
        limit = max_bytes(target)
        if target.name == REPORT_NAME:
            nonce = pages.new_nonce()
            text = read_all(target, limit).decode("utf-8", errors="replace")
            return HTMLResponse(pages.with_view_script(text, nonce), headers=_page_headers(nonce))
        return StreamingResponse(open_capped(target, limit), media_type=content_type, headers=_PRIVATE)
    except LocationRefused as refused:
        return _notice(status.HTTP_403_FORBIDDEN, "Not served", str(refused))
    except FileTooLarge as large:
        return _notice(status.HTTP_413_CONTENT_TOO_LARGE, "Too large to serve", str(large))
    except (FileRefused, FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "No such file in this run's contact sheet") from None
    except OSError:
        # The store's own words can name buckets and credentials: they go to the log only.
        log.exception("Could not read %r of run %s / %s", path, dag_id, run_id)
        return _notice(status.HTTP_502_BAD_GATEWAY, "Not read", "The file could not be read from storage.")
