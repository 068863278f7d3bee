"""
The extra links: what each answers for a task instance, computed where Airflow computes them.

The generate operators' *Generated image* is computed on the worker when the task ends and
stored as an XCom; the plugin's global links are computed by the API server on request.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from imagecb_provider.links import image_link
from imagecb_provider.ui.links import ArchivedImageLink, ContactSheetLink, LostPromptsLink
from imagecb_provider.ui.urls import VIEW_ROUTE, run_view_url

pytestmark = pytest.mark.airflow

RUN_ID = "manual__2026-01-02T03:04:05+00:00"
ONE = {"outcome": "success", "result_image_url": "https://files.example/a.png", "prompt": "a"}
TWO = {"outcome": "success", "result_image_url": "https://files.example/b.png", "prompt": "b"}
LOST = {"outcome": "content_policy", "result_image_url": None, "prompt": "c", "message": "flagged"}


def _key(run: Any, task_id: str, map_index: int = -1) -> Any:
    from airflow.models.taskinstancekey import TaskInstanceKey

    return TaskInstanceKey(run.dag_id, task_id, run.run_id, 1, map_index)


def _stored_link(run: Any, task_id: str, map_index: int) -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return session.scalar(
            select(XComModel.value).where(
                XComModel.dag_id == run.dag_id,
                XComModel.run_id == run.run_id,
                XComModel.task_id == task_id,
                XComModel.map_index == map_index,
                XComModel.key == "_link_GeneratedImageLink",
            )
        )


# ------------------------------------------------------------------ what a result links to
def test_one_image_links_the_image_itself():
    assert image_link(ONE, dag_id="d", run_id=RUN_ID, map_index=-1) == ONE["result_image_url"]
    assert image_link([LOST, ONE], dag_id="d", run_id=RUN_ID, map_index=4) == ONE["result_image_url"]


def test_several_images_link_the_contact_sheet_at_their_group():
    url = image_link([ONE, LOST, TWO], dag_id="my dag", run_id=RUN_ID, map_index=3)
    assert url == run_view_url("my dag", RUN_ID, map_index=3)
    assert url.endswith(f"/dags/my%20dag/runs/{quote(RUN_ID, safe='')}/plugin/{VIEW_ROUTE}#group-3")


@pytest.mark.parametrize(
    "value",
    [None, [], [None], [LOST], {"outcome": "success", "result_image_url": "javascript:alert(1)"}, "text"],
)
def test_no_image_no_link(value):
    assert image_link(value, dag_id="d", run_id=RUN_ID, map_index=0) == ""


# ------------------------------------------------------------------ in Airflow
def test_the_generate_task_stored_its_link_when_it_ended(runs):
    run = runs["with_report"]
    assert _stored_link(run, "image.generate", 0) == run_view_url(run.dag_id, run.run_id, map_index=0)
    assert _stored_link(run, "image.generate", 1) == ""  # its one prompt was lost


def test_contact_sheet_answers_only_for_the_task_that_wrote_the_report(runs):
    run = runs["with_report"]
    sheet = run_view_url(run.dag_id, run.run_id)
    assert ContactSheetLink().get_link(None, ti_key=_key(run, "report")) == sheet
    assert ContactSheetLink().get_link(None, ti_key=_key(run, "image.generate", 0)) == ""


def test_lost_prompts_answers_for_the_groups_that_lost_one(runs):
    run = runs["without_report"]
    lost = LostPromptsLink().get_link(None, ti_key=_key(run, "image.generate", 1))
    assert lost == run_view_url(run.dag_id, run.run_id, map_index=1)
    assert lost.endswith("#group-1")
    assert LostPromptsLink().get_link(None, ti_key=_key(run, "image.generate", 0)) == ""
    assert LostPromptsLink().get_link(None, ti_key=_key(run, "image.settle", 1)) == lost  # a sibling task


def test_the_global_generated_image_reads_what_the_task_returned(runs):
    run = runs["with_report"]
    link = ArchivedImageLink().get_link(None, ti_key=_key(run, "image.generate", 0))
    assert link == run_view_url(run.dag_id, run.run_id, map_index=0)
    assert ArchivedImageLink().get_link(None, ti_key=_key(run, "report")) == ""


def test_the_api_server_lists_the_links_of_a_task_instance(api, token_for, runs):
    run = runs["with_report"]
    api.cookies.set("_token", token_for("viewer"))
    base = f"/api/v2/dags/{run.dag_id}/dagRuns/{quote(run.run_id, safe='')}/taskInstances"
    lost = api.get(f"{base}/image.generate/links", params={"map_index": 1}).json()["extra_links"]
    assert lost == {
        "Contact sheet": None,
        "Generated image": None,
        "Prompts without an image": run_view_url(run.dag_id, run.run_id, map_index=1),
    }
    report = api.get(f"{base}/report/links").json()["extra_links"]
    assert report["Contact sheet"] == run_view_url(run.dag_id, run.run_id)


def test_the_plugin_declares_the_app_the_tab_and_the_links(api, token_for):
    api.cookies.set("_token", token_for("admin"))
    plugins = {p["name"]: p for p in api.get("/api/v2/plugins").json()["plugins"]}
    plugin = plugins["imagecb"]
    assert [(a["name"], a["url_prefix"]) for a in plugin["fastapi_apps"]] == [("imagecb", "/imagecb")]
    view, docs = plugin["external_views"]
    assert (view["name"], view["destination"], view["url_route"]) == ("Contact sheet", "dag_run", VIEW_ROUTE)
    assert view["href"].endswith("/imagecb/dags/{DAG_ID}/runs/{RUN_ID}/view")
    assert (docs["name"], docs["destination"], docs["href"]) == ("imagecb docs", "nav", "/imagecb/docs")
    page = api.get(docs["href"])
    assert page.status_code == 200
    assert "make demo" in page.text
    assert len(plugin["global_operator_extra_links"]) == 3
