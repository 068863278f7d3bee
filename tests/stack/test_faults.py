"""
The batch DAG on a real stack while things go wrong in the middle of a batch.

Each case runs ``imagecb_batch_generate`` on a few dozen fresh prompts (3 s renders, a status
call a second, groups of 8) on the shared stack of its executor, injects one fault at a moment
the test waits for (never after a sleep), and checks the run with :func:`batch_checks.verify_batch`:
every image archived once, each prompt submitted once, the report's counts right.

* the triggerer SIGKILLed while every group is deferred, then started again (Local and Celery);
* the scheduler SIGKILLed while a task of a group runs (a LocalExecutor scheduler takes its running
  tasks down with it: they are reset by the next orphan check, lowered to 10 s for these stacks;
  ``[scheduler] orphaned_tasks_check_interval`` is 300 s by default);
* a generate task killed while its submission waits for its answer: that one request is
  ``submission_uncertain`` (it may have been charged), never resent, quarantined, reported lost;
* the API answering 429, 455 and 500 on 30 % of the calls of every endpoint, and dropping
  connections on every endpoint but generate;
* the archive folder replaced by a file while groups still generate (``chmod`` does not stop a
  task running as root, as the tasks here do), restored before the archive tasks' retry.

``[sim:hold]`` keeps groups generating for as long as a case needs, and ``release`` ends them.
The last cases are about submissions whose fate the task knows although its try failed: refused
until the hook gave up (the retry resends it), answered just before the task was killed, refused
and waiting to be resent when the task was killed. The latter two show defects of the submission
ledger; they pass since the fix (the answer is stored at once, the mark cleared while a
refused submission waits to be resent).
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from batch_checks import (
    ALL_ENDPOINTS,
    COST_PER_IMAGE,
    DAG_ID,
    PACED_CONN_ID,
    Batch,
    Figures,
    account_hold,
    all_in,
    assert_none_uncertain,
    check_manifest,
    check_submissions,
    finish,
    lift_account_hold,
    lost_in_summary,
    new_batch,
    prepare_simulator,
    read_jsonl,
    report_case,
    say,
    states,
    summary_of,
    trigger,
    verify_batch,
    wait_until,
)

pytestmark = [pytest.mark.stack, pytest.mark.timeout(900)]

UNCERTAIN = "submission_uncertain"


def every_group(stack: Any, batch: Batch, task: str, wanted: tuple[str, ...]) -> bool:
    """Tell whether ``image.<task>`` of every group is in one of the ``wanted`` states."""
    return all_in(stack, batch, task, wanted, range(batch.groups))


def in_flight(simulator: Any) -> int:
    """Return how many submissions the simulator received and has not answered yet."""
    return int(simulator.stats(tasks=False)["submissions_in_flight"])


# --------------------------------------------------------------------------------- triggerer
def run_triggerer_kill(stack: Any, simulator: Any, folder: Path, name: str) -> Figures:
    """
    SIGKILL the triggerer while every group is deferred; its images complete while it is down.

    Every other prompt is held, so no group can finish before the kill; they are released once
    the triggerer is dead, and the triggerer started again must take the waits over.
    """
    prepare_simulator(simulator)
    batch = new_batch(folder, name, held=lambda i: i % 2 == 1)
    trigger(stack, batch)
    wait_until(stack, "every group deferred", lambda: every_group(stack, batch, "generate", ("deferred",)))

    killed = stack.kill("triggerer")
    released = simulator.release(all_held=True)
    stack.start_component("triggerer")

    assert len(released) == len(batch.prompts) // 2
    figures = verify_batch(stack, simulator, batch, finish(stack, batch))
    assert figures.other_failures == {}  # the deferred tasks resume in the same try
    figures.notes["killed"] = f"triggerer ({len(killed)} processes) with {batch.groups} groups deferred"
    return figures


def test_triggerer_killed_mid_batch(
    batch_local_stack: Any, batch_simulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """SIGKILL the LocalExecutor stack's triggerer while every group is deferred; restart it."""
    figures = run_triggerer_kill(batch_local_stack, batch_simulator, tmp_path, "triggerer-kill")
    report_case(request.config, figures)


def test_triggerer_killed_mid_batch_on_celery(
    batch_celery_stack: Any, batch_simulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """SIGKILL the CeleryExecutor stack's triggerer while every group is deferred; restart it."""
    figures = run_triggerer_kill(batch_celery_stack, batch_simulator, tmp_path, "celery-triggerer-kill")
    report_case(request.config, figures)


# --------------------------------------------------------------------------------- scheduler
def freeze_a_running_task(stack: Any, batch: Batch, group: int) -> dict[str, int]:
    """
    Stop (SIGSTOP) the process of a task of ``group`` that is still ``running``: ``{name: pid}``.

    A task a few seconds long may end between being seen and being killed; a stopped one cannot,
    so the scheduler's SIGKILL surely lands in the middle of it. Empty when none runs yet.
    """
    processes = stack.task_processes()
    for ti in stack.client.task_instances(DAG_ID, batch.run_id, state="running"):
        pid = processes.get(ti["id"])
        if pid is None or ti["map_index"] != group:
            continue
        os.kill(pid, signal.SIGSTOP)
        if stack.client.task_instance(DAG_ID, batch.run_id, ti["task_id"], group)["state"] == "running":
            return {f"{ti['task_id']}[{group}]": pid}
        os.kill(pid, signal.SIGCONT)  # it ended meanwhile: let it go
    return {}


def test_scheduler_killed_mid_batch(
    batch_local_stack: Any, batch_simulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """
    SIGKILL the scheduler while a task of the first group runs and the other groups are deferred.

    All prompts are held until every group has deferred (no submission under way), then the first
    group's are released; the kill lands in its generate task's resumption or its archive. That
    task dies with the scheduler, stays ``running`` until the orphan check resets it, and runs
    again: its retry reconnects to the stored images, nothing is sent twice.
    """
    stack, simulator = batch_local_stack, batch_simulator
    prepare_simulator(simulator)
    batch = new_batch(tmp_path, "scheduler-kill", held=lambda i: True)
    trigger(stack, batch)
    wait_until(stack, "every group deferred", lambda: every_group(stack, batch, "generate", ("deferred",)))
    for prompt in batch.group_prompts(0):
        simulator.release(prompt=prompt)
    frozen = wait_until(stack, "a task of group 0 running", lambda: freeze_a_running_task(stack, batch, 0))

    killed = stack.kill("scheduler")
    stack.start_component("scheduler")
    simulator.release(all_held=True)

    assert set(frozen.values()) <= set(killed)
    figures = verify_batch(stack, simulator, batch, finish(stack, batch))
    for name in frozen:  # reset by the orphan check and run again, successfully
        assert figures.failed_tries.get(name, [])[-1:] == ["success"], (name, figures.failed_tries)
        assert len(figures.failed_tries[name]) >= 2
    # A LocalExecutor's tasks die with its scheduler: beside the frozen one, group 0's settle (it
    # runs beside archive) may have been running too. Only group 0 may fail a try, and each such
    # task must have run again to success.
    for name, tries in figures.other_failures.items():
        assert name.endswith("[0]"), (name, figures.failed_tries)
        assert tries[-1:] == ["success"], (name, figures.failed_tries)
    figures.notes["killed"] = f"scheduler ({len(killed)} processes) in the middle of {', '.join(frozen)}"
    report_case(request.config, figures)


# --------------------------------------------------------------------------------- answer lost
def test_task_killed_while_its_submission_waits_for_its_answer(
    batch_local_stack: Any, batch_simulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """
    Kill the generate task whose first submission the API took but has not answered yet.

    The request may have been charged (it was: the simulator made the task), and nothing tells
    which remote task it is, so it must end ``submission_uncertain``: submitted once and never
    again, quarantined with its reason, its group's settle red, the report counting it lost.
    The other prompts of the group are submitted by the retry; the other groups are untouched.
    """
    stack, simulator = batch_local_stack, batch_simulator
    prepare_simulator(simulator, submit_answer_delay=600)
    batch = new_batch(tmp_path, "answer-lost", n=24)
    trigger(stack, batch)
    wait_until(stack, "a submission waiting for its answer", lambda: in_flight(simulator) >= 1)
    (prompt,) = simulator.stats()["submissions"]
    group = batch.group_of(prompt)
    assert [g for g, s in states(stack, batch, "generate").items() if s == "running"] == [group]

    stack.kill_task(DAG_ID, batch.run_id, "image.generate", group)
    wait_until(stack, "the simulator saw the client go", lambda: in_flight(simulator) == 0)
    simulator.configure(submit_answer_delay=0)

    state = finish(stack, batch)
    lost, killed = {prompt: UNCERTAIN}, [f"image.generate[{group}]"]
    figures = verify_batch(stack, simulator, batch, state, lost=lost, killed=killed)
    assert figures.failed_tries[f"image.generate[{group}]"][-1] == "success"
    assert len(figures.failed_tries[f"image.generate[{group}]"]) >= 2
    assert {f"image.settle[{group}]", "report"} <= set(figures.failed_tries)
    assert set(figures.other_failures) <= {f"image.generate[{group}]", f"image.settle[{group}]", "report"}
    made = [t for t in simulator.stats()["tasks"].values() if t["prompt"] == prompt]
    assert [t["outcome"] for t in made] == ["success"]  # made and charged, but never known
    quarantined = read_jsonl(batch.day / "quarantine.jsonl")[0]
    assert "not resent automatically" in quarantined["message"]
    assert quarantined["task_id"] is None
    figures.notes["uncertain"] = f"{prompt!r} (group {group})"
    report_case(request.config, figures)
    say(request.config, what_the_user_sees(stack, batch, group, prompt))


def what_the_user_sees(stack: Any, batch: Batch, group: int, prompt: str) -> str:
    """Collect the messages of the lost request in the order a user meets them: logs, quarantine, report."""
    logs = {
        f"generate[{group}] try 1 (killed)": task_messages(stack, batch, "image.generate", group, 1)[-3:],
        f"generate[{group}] try 2": task_messages(stack, batch, "image.generate", group, 2, "uncertain"),
        f"settle[{group}]": task_messages(stack, batch, "image.settle", group, 1, "Quarantined", "ended"),
        "report": task_messages(stack, batch, "report", -1, 1, "Summary", "without an image"),
    }
    entry = next(i for i in summary_of(batch)["images"] if i["prompt"] == prompt)
    lines = ["What the user sees for the request whose answer was lost:"]
    for where, messages in logs.items():
        lines += [f"  {where}:"] + [f"    {m}" for m in messages]
    lines.append(f"  quarantine.jsonl: {read_jsonl(batch.day / 'quarantine.jsonl')[0]['message']}")
    lines.append(f"  summary.json: outcome {entry['outcome']}, reason {entry['reason']}")
    return "\n".join(lines)


def task_messages(
    stack: Any, batch: Batch, task_id: str, map_index: int, try_number: int, *needles: str
) -> list[str]:
    """Return a try's log messages (with the exception, when one is logged), those with a needle if given."""
    found = []
    for raw in stack.task_log(DAG_ID, batch.run_id, task_id, map_index, try_number).splitlines():
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        text = str(event.get("event", ""))
        for detail in event.get("error_detail") or ():
            text += f" | {detail.get('exc_type')}: {detail.get('exc_value')}"
        if not needles or any(needle in text for needle in needles):
            found.append(text)
    return found


# --------------------------------------------------------------------------------- API faults
def test_api_faults_on_every_endpoint(
    batch_local_stack: Any, batch_simulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """
    30 % of the calls to every endpoint answer 429, 455 or 500; connections drop on all but generate.

    The simulator refuses drops on generate (a cut submission is indistinguishable from a lost
    answer), so the drops join once every prompt is submitted. Origin links expire after 1 s, so
    each origin image is fetched through a fresh link from download-url (faulted as well). The
    first two credit calls are forced to a 429 and a drop, so credit sees both whatever the draw.
    """
    stack, simulator = batch_local_stack, batch_simulator
    prepare_simulator(
        simulator,
        fault_rate=0.3,
        fault_kinds=["429", "455", "500"],
        fault_endpoints=list(ALL_ENDPOINTS),
        origin_ttl=1.0,
        seed=11,
    )
    simulator.inject("credit", 429, retry_after=1)
    simulator.inject("credit", drop=True)
    batch = new_batch(tmp_path, "api-faults")
    trigger(stack, batch)
    wait_until(
        stack,
        "every prompt submitted",
        lambda: simulator.stats(tasks=False)["submissions_total"] == len(batch.prompts),
        timeout=300,
    )
    not_generate = [e for e in ALL_ENDPOINTS if e != "generate"]
    simulator.configure(fault_endpoints=not_generate, fault_kinds=["429", "455", "500", "drop"])

    figures = verify_batch(stack, simulator, batch, finish(stack, batch))
    stats = simulator.stats(tasks=False)
    faults = stats["faults_by_endpoint"]
    assert set(ALL_ENDPOINTS) - {"credit"} <= set(faults)  # credit: two calls, forced below
    assert {kind for kinds in faults.values() for kind in kinds} == {"429", "455", "500", "drop"}
    assert "drop" not in faults["generate"]
    assert stats["injected"] == {"429": 1, "drop": 1}
    manifest = read_jsonl(batch.day / "images" / "manifest.jsonl")
    origins = [line for line in manifest if line["source"] == "origin"]
    assert Counter(line["fetched_via"] for line in origins)["download_url"] > 0
    figures.notes["faults"] = {e: dict(k) for e, k in faults.items()} | {"credit (forced)": stats["injected"]}
    figures.notes["origins via"] = dict(Counter(line["fetched_via"] for line in origins))
    report_case(request.config, figures)


# --------------------------------------------------------------------------------- archive
def test_archive_destination_fails_mid_batch(
    batch_local_stack: Any, batch_simulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """
    Replace the day's images folder by a file while two groups still generate, then put it back.

    Their archive tasks fail (the folder cannot be made); the folder comes back before their retry,
    which completes the archive next to the first group's files: no file or line twice.
    """
    stack, simulator = batch_local_stack, batch_simulator
    prepare_simulator(simulator)
    batch = new_batch(tmp_path, "archive-fails", n=24, held=lambda i: i >= 8)
    trigger(stack, batch)
    wait_until(
        stack,
        "group 0 archived, groups 1 and 2 deferred",
        lambda: (
            all_in(stack, batch, "archive", ("success",), [0])
            and all_in(stack, batch, "generate", ("deferred",), [1, 2])
        ),
    )
    images = batch.day / "images"
    away = images.with_name("images.away")
    images.rename(away)
    images.write_text("a file where the images folder was\n")
    simulator.release(all_held=True)
    wait_until(
        stack,
        "the archive tasks of groups 1 and 2 failed",
        lambda: all_in(stack, batch, "archive", ("up_for_retry",), [1, 2]),
    )
    images.unlink()
    away.rename(images)

    figures = verify_batch(stack, simulator, batch, finish(stack, batch))
    assert {"image.archive[1]", "image.archive[2]"} <= set(figures.failed_tries)
    assert set(figures.other_failures) <= {"image.archive[1]", "image.archive[2]"}
    for group in (1, 2):
        assert figures.failed_tries[f"image.archive[{group}]"] == ["failed", "success"]
    errors = task_messages(stack, batch, "image.archive", 1, 1, "Error", "error")
    assert errors, stack.task_log(DAG_ID, batch.run_id, "image.archive", 1, 1)
    figures.notes["archive try 1"] = errors[-1][:200]
    report_case(request.config, figures)


# --------------------------------------------------------------------------------- known fates
def test_task_killed_after_its_submission_was_answered(
    batch_local_stack: Any, batch_simulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """
    Kill a generate task after its first submission was answered, while it paces the second.

    The answer (the remote task id) reached the task: a retry must reconnect to that image, not
    report it uncertain. The paced connection (1 submission per 10 s) makes the wait last.
    """
    stack, simulator = batch_local_stack, batch_simulator
    prepare_simulator(simulator)
    batch = new_batch(tmp_path, "answered-then-killed", n=2, chunk_size=2, imagecb_conn_id=PACED_CONN_ID)
    trigger(stack, batch)
    wait_until(
        stack,
        "the first submission answered in the task",
        lambda: task_messages(stack, batch, "image.generate", 0, 1, "Submitted image task"),
    )
    assert simulator.stats(tasks=False)["submissions_total"] == 1

    stack.kill_task(DAG_ID, batch.run_id, "image.generate", 0)
    state = finish(stack, batch)

    assert_none_uncertain(batch)
    figures = verify_batch(stack, simulator, batch, state, killed=["image.generate[0]"])
    report_case(request.config, figures)


def test_a_submission_refused_through_every_retry_is_a_cap_and_a_cleared_run_sends_it_once(
    batch_local_stack: Any, batch_simulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """
    Answer the first six submissions with 429: refused through every attempt, it is a cap, not a burst.

    The group stops: both prompts end ``not_sent`` (nothing created or charged) and the account is
    put on hold. Once the hold is lifted (as a user may, from Admin > Variables), clearing the run
    sends each prompt once and archives both images.
    """
    stack, simulator = batch_local_stack, batch_simulator
    prepare_simulator(simulator)
    lift_account_hold(stack)
    simulator.inject("generate", 429, times=6, retry_after=1)
    batch = new_batch(tmp_path, "refused-submission", n=2, chunk_size=2)
    trigger(stack, batch)
    try:
        assert finish(stack, batch) == "failed"
        summary = summary_of(batch)
        assert summary["not_sent"]["count"] == 2, lost_in_summary(batch)
        assert "hourly, daily or total cap" in summary["not_sent"]["reason"]
        assert simulator.stats(tasks=False)["requests"]["generate"] == 6  # one request, its six attempts
        assert simulator.stats()["submissions"] == {}
        assert account_hold(stack)["kind"] == "rate_cap"
    finally:
        lift_account_hold(stack)

    stack.client.clear(DAG_ID, batch.run_id)  # "Clear the run"
    assert finish(stack, batch) == "success", lost_in_summary(batch)
    check_rerun(simulator, batch, reused=0)
    say(
        request.config,
        f"[{stack.executor}] refused-submission: a cap, then a cleared run sent each prompt once",
    )


def test_credits_running_out_partway_stop_every_group_and_a_top_up_rerun_sends_only_the_rest(
    batch_local_stack: Any, batch_simulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """
    The account pays for 12 of 30 prompts (4 groups): the 13th submission is refused with 402.

    No group sends anything after it: 13 submissions in all, 18 prompts ``not_sent``, the run
    failed saying so. After a top-up, clearing the failed tasks sends exactly the 18, once each.
    """
    stack, simulator = batch_local_stack, batch_simulator
    # IMAGECB_CREDITS_CASE_PROMPTS=200 replays it at the size (80 paid, groups of 50).
    n = int(os.environ.get("IMAGECB_CREDITS_CASE_PROMPTS") or 30)
    paid, rest = n * 2 // 5, n - n * 2 // 5
    prepare_simulator(simulator, credits=paid * COST_PER_IMAGE)
    lift_account_hold(stack)
    batch = new_batch(tmp_path, "credits-run-out", n=n, chunk_size=max(8, n // 4))
    trigger(stack, batch)
    try:
        assert finish(stack, batch) == "failed"
        summary = summary_of(batch)
        counts = (summary["counts"]["success"], summary["not_sent"]["count"])
        assert counts == (paid, rest), lost_in_summary(batch)
        assert summary["not_sent"]["reason"].startswith("the account ran out of credits (402 at ")
        assert simulator.stats(tasks=False)["requests"]["generate"] == paid + 1
        assert account_hold(stack)["kind"] == "credits"
        say(request.config, f"{grid_of(stack, batch)}\nreport: {summary['not_sent']}")
    finally:
        simulator.configure(credits=1e9)  # the top-up: the hold lifts by itself on the next check
    stack.client.clear(DAG_ID, batch.run_id)  # "Clear the run"
    try:
        assert finish(stack, batch) == "success", lost_in_summary(batch)
        assert account_hold(stack) is None
    finally:
        lift_account_hold(stack)
    check_rerun(simulator, batch, reused=paid)
    assert simulator.stats(tasks=False)["requests"]["generate"] == paid + 1 + rest
    per_prompt = dict(Counter(simulator.stats()["submissions"].values()))
    say(
        request.config,
        f"{grid_of(stack, batch)}\n[{stack.executor}] credits-run-out: {paid} paid, 1 refused, then "
        f"{rest} after the top-up; submissions per prompt {per_prompt}",
    )


def grid_of(stack: Any, batch: Batch) -> str:
    """The run's grid as a user reads it: each instance's name and state."""
    tis = stack.client.task_instances(DAG_ID, batch.run_id)
    return "\n".join(
        f"  {ti['task_id']}[{ti['map_index']}] {ti['rendered_map_index'] or ''}: {ti['state']}"
        for ti in sorted(tis, key=lambda t: (t["map_index"], t["task_id"]))
    )


def check_rerun(simulator: Any, batch: Batch, *, reused: int) -> None:
    """After a cleared run: each prompt archived once and accepted once; ``reused`` kept from before."""
    stats = simulator.stats()
    check_manifest(batch, stats, batch.prompts)
    check_submissions(batch, stats)
    summary = summary_of(batch)
    assert (summary["counts"]["success"], summary["lost"]) == (len(batch.prompts), 0)
    assert summary["reused_from_earlier_run"] == reused
    assert summary["not_sent"]["count"] == 0


def test_task_killed_while_a_refused_submission_waits_to_be_resent(
    batch_local_stack: Any, batch_simulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """
    Refuse the first submission with 429 and ``Retry-After: 60``; kill the task while it waits.

    Nothing was accepted, so the retry must submit the request again: each prompt accepted once.
    """
    stack, simulator = batch_local_stack, batch_simulator
    prepare_simulator(simulator)
    simulator.inject("generate", 429, retry_after=60)
    batch = new_batch(tmp_path, "refused-then-killed", n=2, chunk_size=2)
    trigger(stack, batch)
    wait_until(
        stack, "the first submission refused", lambda: simulator.stats(tasks=False)["injected"].get("429")
    )

    stack.kill_task(DAG_ID, batch.run_id, "image.generate", 0)
    state = finish(stack, batch)

    assert_none_uncertain(batch)
    figures = verify_batch(stack, simulator, batch, state, killed=["image.generate[0]"])
    report_case(request.config, figures)
