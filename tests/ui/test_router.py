"""
The contact sheet routes and the extra links, in Airflow's own API server app.

Two runs are made with ``dag.test()`` against the simulator: ``with_report`` (a mapped group of
generate tasks, one prompt lost, and a report task that writes a report and an image the way the
batch DAG lays them out) and ``without_report`` (the group only). Requests carry real tokens of
the API server's auth manager, in the ``_token`` cookie the login page sets, or as a bearer.
"""

from __future__ import annotations

import pytest
from uihelpers import IMAGE, SECRET, Run

from imagecb_provider.batch.report import run_folder_name

pytestmark = pytest.mark.airflow


# ------------------------------------------------------------------ authentication
@pytest.mark.parametrize("tail", ["view", "files/images/abc123.jpg"])
def test_no_user_is_refused(api, runs, tail):
    answer = api.get(runs["with_report"].url(tail))
    assert answer.status_code == 401
    assert IMAGE.decode(errors="ignore") not in answer.text


@pytest.mark.parametrize("tail", ["view", "files/images/abc123.jpg"])
def test_a_forged_token_is_refused(api, runs, tail):
    api.cookies.set("_token", "not-a-jwt")
    assert api.get(runs["with_report"].url(tail)).status_code == 403


@pytest.mark.parametrize("tail", ["view", "files/images/abc123.jpg", "files/runs/x/report.html"])
def test_a_user_without_access_to_the_dag_is_refused(api, runs, token_for, tail):
    api.cookies.set("_token", token_for(None))  # a real, signed user with no role: no DAG access
    answer = api.get(runs["with_report"].url(tail))
    assert answer.status_code == 403
    assert "Sheet" not in answer.text


def test_a_bearer_token_works_like_the_cookie(api, runs, token_for):
    headers = {"Authorization": f"Bearer {token_for('viewer')}"}
    answer = api.get(runs["with_report"].url("files/images/abc123.jpg"), headers=headers)
    assert (answer.status_code, answer.content) == (200, IMAGE)


# ------------------------------------------------------------------ the report and its images
def test_the_view_redirects_to_the_report_whose_relative_images_are_served(viewer, runs):
    run = runs["with_report"]
    answer = viewer.get(run.url("view"))
    assert answer.status_code == 307
    location = answer.headers["location"]
    assert location == f"files/runs/{run_folder_name(run.run_id)}/report.html"

    report_url = run.url(location)
    page = viewer.get(report_url)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<h1>Sheet</h1>" in page.text
    policy = page.headers["content-security-policy"]
    nonce = policy.split("'nonce-", 1)[1].split("'", 1)[0]
    assert f'<script nonce="{nonce}">' in page.text
    assert "frame-ancestors 'self'" in policy

    # the report's own relative link, resolved as a browser resolves it
    image_url = report_url.rsplit("/", 3)[0] + "/images/abc123.jpg"
    assert image_url == run.url("files/images/abc123.jpg")
    image = viewer.get(image_url)
    assert (image.status_code, image.headers["content-type"], image.content) == (200, "image/jpeg", IMAGE)
    assert image.headers["x-content-type-options"] == "nosniff"


def test_an_edits_before_picture_copied_into_the_run_folder_is_served(viewer, runs):
    from uihelpers import IMAGE, INPUT_SHA

    run = runs["with_report"]
    answer = viewer.get(run.url(f"files/runs/{run_folder_name(run.run_id)}/inputs/{INPUT_SHA}.jpg"))
    assert (answer.status_code, answer.headers["content-type"], answer.content) == (200, "image/jpeg", IMAGE)
    for name in ("notes.txt", f"{INPUT_SHA}.txt", "ab.jpg", f"{INPUT_SHA}.jpg/x"):
        refused = viewer.get(run.url(f"files/runs/{run_folder_name(run.run_id)}/inputs/{name}"))
        assert refused.status_code == 404, name


def test_the_summary_is_served(viewer, runs):
    run = runs["with_report"]
    answer = viewer.get(run.url(f"files/runs/{run_folder_name(run.run_id)}/summary.json"))
    assert (answer.status_code, answer.json()) == (200, {"lost": 1})


@pytest.mark.parametrize(
    "tail",
    [
        "files/../../../secret.txt",
        "files/images/../../../secret.txt",
        "files/images/%2e%2e/%2e%2e/%2e%2e/secret.txt",
        "files/images/..%2f..%2f..%2fsecret.txt",
        "files//etc/passwd",
        "files/images/escape.jpg",  # a symbolic link leading out of the day folder
        "files/images/.hidden.jpg",
        "files/images/manifest.jsonl",
        "files/images/abc123.jpg/",
        "files/runs/another_run/report.html",
        "files/secret.jpg",
        "files/../secret.jpg",
        "files/images/nothere.jpg",
    ],
)
def test_anything_but_the_runs_own_files_is_refused(viewer, runs, tail):
    answer = viewer.get(runs["with_report"].url(tail))
    assert answer.status_code == 404
    assert SECRET not in answer.text


def test_an_unknown_run_is_not_found(viewer, runs):
    run = runs["with_report"]
    missing = Run(run.dag_id, "manual__1999-01-01T00:00:00+00:00", run.root)
    assert viewer.get(missing.url("view")).status_code == 404
    assert viewer.get(missing.url("files/images/abc123.jpg")).status_code == 404


# ------------------------------------------------------------------ before a report exists
def test_without_a_report_the_view_shows_the_results_so_far(viewer, runs):
    run = runs["without_report"]
    answer = viewer.get(run.url("view"))
    assert answer.status_code == 200
    page = answer.text
    assert "No contact sheet for this run yet" in page
    for prompt in ("a lantern", "a kite", "a fox [sim:content_policy]"):
        assert prompt in page
    assert page.count('data-group="0"') == 2
    assert page.count('data-group="1"') == 1
    assert "content_policy" in page
    assert 'class="card lost"' in page
    assert viewer.get(run.url("files/images/abc123.jpg")).status_code == 404


# ------------------------------------------------------------------ the app keeps the callbacks
def test_the_callback_receiver_is_mounted_in_the_same_app(api):
    answer = api.get("/imagecb/callbacks/health")
    assert answer.status_code in (200, 503)  # 503: this test database has no callback tables
    assert "detail" in answer.json() or "ok" in answer.text.lower()


def test_the_provider_serves_its_own_documentation(api):
    """The nav entry leads to the README, rendered."""
    answer = api.get("/imagecb/docs")
    assert answer.status_code == 200
    assert "<h1>imagecb" in answer.text
    assert "make demo" in answer.text
