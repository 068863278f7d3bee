"""
The batch as a person sees it: Chromium, driven by Playwright, on the real Airflow stack.

One run of ``imagecb_batch_generate`` is triggered from the DAG page's *Trigger* form, against
the simulator, on six prompts in groups of two:

====================  =====  =====================================================
group (map index)     lines  what happens
====================  =====  =====================================================
``lines 2-3`` (0)     2, 3   both succeed
``lines 4-5`` (1)     4, 5   line 5 is flagged (content policy): lost for good
``lines 6-7`` (2)     6, 7   line 7 is held by the simulator past the run's timeout
                             (40 s): lost, until the test releases it and reruns the group
====================  =====  =====================================================

The tests then check what a person sees: every mapped instance named by its prompts, the groups
that lost a prompt in red with the reason one click away, the run's *Contact sheet* tab with its
images (behind Airflow's login), and the rerun of one group from the *Clear* dialog. Screenshots
go to ``artifacts/screenshots/`` (CI's artefact folder).

Needs Debian's Chromium (``/usr/bin/chromium``; Playwright's own browser download cannot work
here) and the local PostgreSQL: without either the tests fail with what to install or start.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

pytestmark = [pytest.mark.airflow, pytest.mark.browser, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = Path(os.environ.get("IMAGECB_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DAG_ID = "imagecb_batch_generate"
VIEW_TAB = "Contact sheet"
POLICY = "a crowd scene the policy will flag [sim:content_policy]"
HELD = "a hot air balloon over a desert [sim:hold]"
PROMPTS = [
    "a lighthouse on a cliff at dawn",
    "a red bicycle against a white wall",
    "a bowl of ramen seen from above",
    POLICY,
    "a paper crane on a wooden desk",
    HELD,
]
LABELS = ["lines 2-3 (2 prompts)", "lines 4-5 (2 prompts)", "lines 6-7 (2 prompts)"]
#: Seconds an image may take in this run: the held prompt times out after it; the others need far
#: less, even when a busy triggerer picks their wait up late (its first poll can come 10-20 s late).
TIMEOUT = 40


@dataclass
class BatchRun:
    """The run the tests look at."""

    run_id: str
    state: str
    archive: Path
    stack: Any
    simulator: Any

    @property
    def path(self) -> str:
        return f"/dags/{DAG_ID}/runs/{quote(self.run_id, safe='')}"

    def task_instances(self) -> dict[tuple[str, int], dict[str, Any]]:
        tis = self.stack.client.task_instances(DAG_ID, self.run_id)
        return {(ti["task_id"], ti["map_index"]): ti for ti in tis}


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def simulator() -> Iterator[Any]:
    """The image API simulator in its own process (the stack's tasks call it over HTTP)."""
    from imagecb_provider.testing.simulator import run_in_subprocess

    with run_in_subprocess(latency=0.5) as running:
        yield running


@pytest.fixture(scope="module")
def stack(airflow_stacks: Any, simulator: Any) -> Any:
    """The real stack (API server, scheduler, DAG processor, triggerer; PostgreSQL) on the simulator."""
    from imagecb_dev.stack import StackUnavailable

    try:
        return airflow_stacks.get(
            connections={"imagecb_default": simulator.connection_json()},
            parallelism=8,
            dag_ids=[DAG_ID],
        )
    except StackUnavailable as error:
        pytest.fail(f"The browser test needs the real stack: {error}", pytrace=False)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless (Playwright's own browser download cannot work here)."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}: install it (apt-get install chromium) "
            "or point IMAGECB_CHROMIUM at a Chromium binary",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def page(browser: Any, stack: Any) -> Iterator[Any]:
    """A browser tab logged in through Airflow's login page, as a person does."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    # A bound on each wait, not a timing: on two busy cores the UI's first render of a page has
    # taken over 30 s (the grid's "Expand all task groups" button, seen once in a loaded CI run).
    context.set_default_timeout(90_000)
    tab = context.new_page()
    tab.goto(stack.url + "/")
    tab.wait_for_url(re.compile(r"/auth/login"))
    tab.get_by_label("Username").fill(stack.username)
    tab.get_by_label("Password").fill(stack.password)
    tab.get_by_role("button", name="Sign in").click()
    tab.wait_for_url(lambda url: "/auth/login" not in url)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield tab
    finally:
        context.close()


@pytest.fixture(scope="module")
def batch_run(page: Any, stack: Any, simulator: Any, tmp_path_factory: pytest.TempPathFactory) -> BatchRun:
    """The batch, triggered from the DAG page's Trigger form, finished."""
    folder = tmp_path_factory.mktemp("batch")
    prompts = folder / "prompts.csv"
    prompts.write_text("prompt\n" + "".join(f"{json.dumps(p)}\n" for p in PROMPTS))
    archive = folder / "archive"
    run_id = f"ui_test__{time.strftime('%Y%m%dT%H%M%S')}"

    page.goto(f"{stack.url}/dags/{DAG_ID}")
    page.get_by_role("button", name="Trigger Dag").click()
    form = page.get_by_role("dialog")
    form.locator("#element_prompts_path").fill(str(prompts))
    form.locator("#element_archive_root").fill(str(archive))
    for name, value in (("poll_interval", 1), ("timeout", TIMEOUT), ("chunk_size", 2)):
        _fill_number(page, name, value)
    form.get_by_role("button", name="Advanced Options").click()
    form.locator('input[name="dagRunId"]').fill(run_id)
    form.get_by_test_id("trigger-dag-submit").click()
    page.wait_for_url(re.compile(re.escape(f"/runs/{run_id}")))

    state = stack.wait_for_run(DAG_ID, run_id, timeout=300)
    return BatchRun(run_id, state, archive, stack, simulator)


def _fill_number(page: Any, name: str, value: float) -> None:
    """Type into one of the trigger form's number fields (found by its param name)."""
    input_id = page.locator(f'[id="number-input:element_{name}:inc"]').get_attribute("aria-controls")
    field = page.locator(f'[id="{input_id}"]')
    field.fill(str(value))
    field.blur()


def _sheet(page: Any) -> Any:
    """The Contact sheet tab's frame, once its page has loaded."""
    page.locator(f'iframe[title="{VIEW_TAB}"]').wait_for()
    frame = page.frame_locator(f'iframe[title="{VIEW_TAB}"]')
    frame.locator(".card").first.wait_for()
    return next(f for f in page.frames if "/imagecb/" in f.url)


_LOAD_IMAGES = """async () => {
  const images = Array.from(document.images);
  images.forEach((image) => { image.loading = "eager"; });  // the sheet's are lazy: load them all now
  await Promise.all(images.map((image) => image.complete ? null : new Promise((done) => {
    image.addEventListener("load", done);
    image.addEventListener("error", done);
  })));
  return images.map((image) => [image.getAttribute("src"), image.naturalWidth > 0]);
}"""


def _images(frame: Any) -> list[tuple[str, bool]]:
    """Load every image of a page; return each one's source and whether it loaded and decoded."""
    return [tuple(pair) for pair in frame.evaluate(_LOAD_IMAGES)]


def _assert_is_the_report(frame: Any, run_id: str) -> None:
    """Fail, saying why, when the tab shows the results so far instead of the run's report."""
    heading = frame.locator("h1").inner_text()
    assert heading == f"Image batch {run_id}", (
        "the tab shows no contact sheet: the run's report task did not return its paths "
        f"(it shows {heading!r}); a report task that fails the run must still return "
        '{"summary": ..., "report": ...} (push its XCom before raising)'
    )


def _wait_for(check: Callable[[], Any], what: str, timeout: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen after {timeout:g}s: {what}")
        time.sleep(1.0)
    return result


# ---------------------------------------------------------------------------- what a person sees
def test_every_mapped_instance_is_named_by_its_prompts(page, batch_run):
    tis = batch_run.task_instances()
    for task in ("image.generate", "image.archive", "image.settle"):
        names = [tis[(task, i)]["rendered_map_index"] or "" for i in range(3)]
        # a failed settle may add why to its name ("lines 4-5 (2 prompts) · 1 lost: content_policy")
        assert all(name.startswith(label) for name, label in zip(names, LABELS, strict=True)), names
        assert names[0] == LABELS[0]

    page.goto(f"{batch_run.stack.url}{batch_run.path}/tasks/group/image")
    page.get_by_role("button", name="Expand all task groups").click()
    table = page.locator("table").first
    for label in LABELS:
        expect_rows = table.locator("tr", has_text=label)
        _wait_for(lambda rows=expect_rows: rows.count() == 3, f"three instances labelled {label!r}", 30)
    page.screenshot(path=SCREENSHOTS / "grid.png")


def test_a_group_that_lost_a_prompt_is_red_and_says_why(page, batch_run):
    assert batch_run.state == "failed"  # fail_run_on_lost is on by default
    tis = batch_run.task_instances()
    assert [tis[("image.settle", i)]["state"] for i in range(3)] == ["success", "failed", "failed"]
    assert tis[("report", -1)]["state"] == "failed"

    page.goto(f"{batch_run.stack.url}{batch_run.path}/tasks/image.settle/mapped")
    rows = page.locator("table").first.locator("tbody tr")
    rows.first.wait_for()
    shown = {label: rows.filter(has_text=label).inner_text() for label in LABELS}
    assert "Success" in shown[LABELS[0]]
    assert "Failed" in shown[LABELS[1]]
    assert "Failed" in shown[LABELS[2]]

    # the failed instance's links: the reason is one click away
    page.goto(f"{batch_run.stack.url}{batch_run.path}/tasks/image.settle/mapped/1/details")
    page.get_by_role("link", name="Prompts without an image").click()
    page.wait_for_url(re.compile(r"/plugin/imagecb-contact-sheet#group-1$"))
    frame = _sheet(page)
    chosen = frame.locator(".card.imagecb-chosen")
    _wait_for(lambda: chosen.count() == 2, "the two cards of group 1 highlighted", 30)
    _images(frame)
    page.screenshot(path=SCREENSHOTS / "failed-prompt.png")
    lost = chosen.filter(has_text=POLICY)
    assert "lost" in (lost.get_attribute("class") or "")
    assert "content_policy" in lost.inner_text()
    assert "flagged" in lost.inner_text().lower()


def test_the_run_view_shows_the_contact_sheet_with_its_images(page, browser, batch_run):
    page.goto(f"{batch_run.stack.url}{batch_run.path}")
    page.get_by_role("tab", name=VIEW_TAB).or_(page.get_by_role("link", name=VIEW_TAB)).first.click()
    frame = _sheet(page)
    images = _images(frame)
    page.screenshot(path=SCREENSHOTS / "run-view.png")
    _assert_is_the_report(frame, batch_run.run_id)
    assert len(images) == 4, images  # lines 2, 3, 4 and 6; lines 5 and 7 have none
    assert all(src.startswith("../../images/") and loaded for src, loaded in images), images
    for line in (5, 7):
        assert "lost" in (frame.locator(f"#line-{line}").get_attribute("class") or "")
    assert "· 2 without an image ·" in frame.locator(".meta").inner_text()

    # the same page without Airflow's login: refused
    stranger = browser.new_context()
    try:
        answer = stranger.request.get(frame.url)
        assert answer.status == 401
        assert "Image batch" not in answer.text()
    finally:
        stranger.close()

    # a card's link opens its task instance in the UI, not inside the frame
    frame.locator("#line-2 a.ti").click()
    page.wait_for_url(re.compile(r"/tasks/image\.generate/mapped/0$"))
    page.get_by_text(f"image.generate [{LABELS[0]}]").first.wait_for()

    # and back: the group's "Generated image" (two images) opens this view at the group
    page.goto(f"{batch_run.stack.url}{batch_run.path}/tasks/image.generate/mapped/0/details")
    page.get_by_role("link", name="Generated image").click()
    page.wait_for_url(re.compile(r"/plugin/imagecb-contact-sheet#group-0$"))
    chosen = _sheet(page).locator(".card.imagecb-chosen")
    _wait_for(lambda: chosen.count() == 2, "the two cards of group 0 highlighted", 30)
    # one image: the link is the image itself
    page.goto(f"{batch_run.stack.url}{batch_run.path}/tasks/image.archive/mapped/2/details")
    href = page.get_by_role("link", name="Generated image").get_attribute("href")
    assert href.startswith(batch_run.simulator.url), href


def test_clearing_one_group_reruns_it_and_updates_the_report(page, batch_run):
    simulator, stack = batch_run.simulator, batch_run.stack
    simulator.release(prompt=HELD)  # the image it was still making is ready now
    submitted_before = simulator.stats(tasks=False)["submissions"]

    page.goto(f"{stack.url}{batch_run.path}/tasks/image.generate/mapped/2")
    page.get_by_role("button", name="Press shift+c to clear").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Affected Tasks: 4").wait_for()  # Downstream is preselected
    rows = dialog.locator("tbody tr")
    affected = sorted(" ".join(rows.nth(i).inner_text().split()[:1]) for i in range(rows.count()))
    assert affected == ["image.archive", "image.generate", "image.settle", "report"]
    dialog.get_by_role("button", name="Confirm").click()

    def rerun_finished() -> bool:
        tis = batch_run.task_instances()
        report = tis[("report", -1)]
        return report["try_number"] >= 2 and report["state"] in ("success", "failed")

    _wait_for(rerun_finished, "the cleared group and the report to run again")
    tis = batch_run.task_instances()
    assert tis[("image.generate", 2)]["try_number"] == 2
    assert tis[("image.settle", 2)]["state"] == "success"
    assert [tis[(task, 0)]["try_number"] for task in ("image.generate", "image.settle")] == [1, 1]
    # reconnected to the image being made: nothing was submitted (or paid for) again
    assert simulator.stats(tasks=False)["submissions"] == submitted_before

    page.goto(f"{stack.url}{batch_run.path}/plugin/imagecb-contact-sheet#group-2")  # the rerun group
    frame = _sheet(page)
    images = _images(frame)
    page.screenshot(path=SCREENSHOTS / "rerun.png")
    _assert_is_the_report(frame, batch_run.run_id)
    card = frame.locator("#line-7")
    assert "lost" not in (card.get_attribute("class") or "")
    assert "success" in card.inner_text()
    assert "· 1 without an image ·" in frame.locator(".meta").inner_text()  # was 2
    assert all(loaded for _, loaded in images), images
