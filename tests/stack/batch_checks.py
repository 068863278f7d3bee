"""
What the real-stack tests of the batch DAG share: the simulator and stack they run on, the batch of
prompts of one case, waiting for moments of a run, and one check of a finished run.

:func:`verify_batch` is the single definition of "the batch ended right": every image archived
once (one manifest line per remote task and source, files valid, nothing else in the folder),
each prompt submitted exactly once (``/_sim/stats``), the report's counts equal to what happened
(``summary.json``), the lost prompts quarantined with a reason, and the task states that follow
(``settle`` red exactly where a prompt was lost, ``report`` red when any was). It returns the
figures of the case, which :func:`report_case` prints.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

DAG_ID = "imagecb_batch_generate"
#: The connection the batch uses by default, and one paced at one submission per 10 s (to widen
#: the moment between two submissions of a task).
CONN_ID = "imagecb_default"
PACED_CONN_ID = "imagecb_paced"
#: A connection whose submitting tasks share the limit two ways (``submission_slots``: 2).
SHARED_CONN_ID = "imagecb_shared"
SUBMISSIONS_PER_10S = 40
#: Every endpoint the simulator can fault (``fault_endpoints``).
ALL_ENDPOINTS = ("generate", "record-info", "credit", "download-url", "files")
#: The simulator's options for the whole session; ``BASE_CONFIG`` is restored before each case.
SIMULATOR_FIELDS: dict[str, Any] = {
    "latency": 3.0,
    "credits": 1e9,
    "rate_limit_count": SUBMISSIONS_PER_10S,
    "rate_limit_window": 10.0,
}
BASE_CONFIG: dict[str, Any] = {
    "latency": 3.0,
    "credits": 1e9,
    "submission_cap": None,
    "fault_rate": 0.0,
    "fault_kinds": ["500", "455", "drop"],
    "fault_endpoints": ["record-info"],
    "submit_answer_delay": 0.0,
    "origin_ttl": 600.0,
    "seed": 0,
}
COST_PER_IMAGE = 5.0  # flux-kontext-pro in the simulator
HOLD = " [sim:hold]"
#: How long a whole run may take before the test gives up (a hang, not a timing assertion).
RUN_TIMEOUT = 600.0
FINISHED = ("success", "failed")
#: What Airflow 3.3.2's scheduler logs when the executor reports "success" for a try whose task
#: instance is queued or running: it then fails that try. It happens when the scheduler handles the
#: success of a deferral exit after the trigger already fired and the task was queued or running
#: again (apache/airflow#67287 for queued, #72716 for running; 3.3.2 guards only "scheduled"): the
#: retry reconnects to the stored images, so it costs a retry delay, never an image. It is also how a
#: task process killed under a LocalExecutor worker ends (its supervisor exits normally).
STALE_EXIT_EVENT = "finished with state success, but the task instance's state attribute is"


# ------------------------------------------------------------------------------- the stack
def stack_options(simulator: Any, executor: str) -> dict[str, Any]:
    """
    Return the options of the stack the batch tests share, its connections pointing at ``simulator``.

    ``orphaned_tasks_check_interval`` is lowered from 300 s: a LocalExecutor scheduler killed with
    SIGKILL leaves its running tasks ``running`` until a scheduler checks for orphans. The batch
    DAG's retries wait 5 s instead of 30 s: long enough for a case to act between a failed try
    and its retry.
    """
    conn = json.loads(simulator.connection_json())
    return {
        "executor": executor,
        "parallelism": 8,
        "connections": {
            CONN_ID: {**conn, "extra": {"submissions_per_10s": SUBMISSIONS_PER_10S}},
            PACED_CONN_ID: {**conn, "extra": {"submissions_per_10s": 1}},
            SHARED_CONN_ID: {
                **conn,
                "extra": {"submissions_per_10s": SUBMISSIONS_PER_10S, "submission_slots": 2},
            },
        },
        "env": {"AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10", "IMAGECB_BATCH_RETRY_DELAY": "5"},
    }


#: The Variable in which a task puts the account on hold (imagecb_provider.utils.limiter.hold_key).
HOLD_KEY = f"imagecb_account_hold__{CONN_ID}"


def account_hold(stack: Any) -> dict[str, Any] | None:
    """Return the account hold the stack's tasks recorded (a Variable), or ``None``."""
    from imagecb_dev.stack.errors import StackAPIError

    try:
        return json.loads(stack.client.get(f"variables/{HOLD_KEY}")["value"])
    except StackAPIError as error:
        if error.status_code == 404:
            return None
        raise


def lift_account_hold(stack: Any) -> None:
    """Delete the account hold, as a user may from Admin > Variables (no error when there is none)."""
    from imagecb_dev.stack.errors import StackAPIError

    try:
        stack.client.delete(f"variables/{HOLD_KEY}")
    except StackAPIError as error:
        if error.status_code != 404:
            raise


def prepare_simulator(simulator: Any, **fields: Any) -> None:
    """Forget every earlier task and counter; restore the base config, then apply ``fields``."""
    simulator.configure(**BASE_CONFIG)
    simulator.reset()
    if fields:
        simulator.configure(**fields)


# ------------------------------------------------------------------------------- a batch
@dataclass
class Batch:
    """
    One case's prompts, its archive root and its run.

    :param name: the case, e.g. ``triggerer-kill``
    :param root: the archive root (a fresh folder per case)
    :param prompts: every prompt, in file order (line ``i + 2`` of the CSV)
    :param chunk_size: prompts per group
    :param conf: the run's conf
    """

    name: str
    root: Path
    prompts: list[str]
    chunk_size: int
    conf: dict[str, Any]
    executor: str = ""
    run_id: str = ""
    started: float = 0.0
    ended: float = 0.0

    @property
    def groups(self) -> int:
        """How many groups (mapped instances) the prompts make."""
        return -(-len(self.prompts) // self.chunk_size)

    def group_of(self, prompt: str) -> int:
        """Return the map index of the group that generates ``prompt``."""
        return self.prompts.index(prompt) // self.chunk_size

    def group_prompts(self, group: int) -> list[str]:
        """Return the prompts of one group."""
        return self.prompts[group * self.chunk_size : (group + 1) * self.chunk_size]

    @property
    def day(self) -> Path:
        """The day folder the run wrote (``<root>/<YYYY-MM-DD>``)."""
        days = sorted(p for p in self.root.iterdir() if p.is_dir())
        assert len(days) == 1, f"expected one day folder in {self.root}, found {days}"
        return days[0]

    @property
    def wall_seconds(self) -> float:
        """Seconds from the trigger to the end of the run (or until now)."""
        return round((self.ended or time.monotonic()) - self.started, 1)


def new_batch(
    folder: Path,
    name: str,
    *,
    n: int = 30,
    chunk_size: int = 8,
    held: Callable[[int], bool] = lambda i: False,
    **conf: Any,
) -> Batch:
    """
    Write a CSV of ``n`` prompts unique to this case and return its :class:`Batch`.

    :param held: which prompts (by position) carry ``[sim:hold]``: generating until released
    :param conf: run conf on top of the case's prompts, archive root, chunk size and poll interval
    """
    token = secrets.token_hex(3)
    prompts = [f"{name} {token} image {i}" + (HOLD if held(i) else "") for i in range(n)]
    root = folder / "archive"
    root.mkdir(parents=True)
    path = folder / f"{name}.csv"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["prompt"])
    writer.writerows([p] for p in prompts)
    path.write_text(buffer.getvalue())
    run_conf = {
        "prompts_path": str(path),
        "archive_root": str(root),
        "chunk_size": chunk_size,
        "poll_interval": 1,
        "timeout": 600,
        **conf,
    }
    return Batch(name=name, root=root, prompts=prompts, chunk_size=chunk_size, conf=run_conf)


def trigger(stack: Any, batch: Batch) -> str:
    """Trigger the batch DAG with the case's conf; remember the run id and the start."""
    batch.executor = stack.executor
    batch.started = time.monotonic()
    batch.run_id = stack.trigger(DAG_ID, conf=batch.conf)
    return batch.run_id


def finish(stack: Any, batch: Batch, timeout: float = RUN_TIMEOUT) -> str:
    """Wait for the run to end; return its state (the stack's logs come with a timeout)."""
    state = stack.wait_for_run(DAG_ID, batch.run_id, timeout=timeout)
    batch.ended = time.monotonic()
    return state


def end_leftover_runs(stack: Any) -> None:
    """Fail the batch runs a failed test left running, so the next case is not queued behind them."""
    runs = stack.client.get(f"dags/{DAG_ID}/dagRuns", limit=100)["dag_runs"]
    for run in runs:
        if run["state"] not in FINISHED:
            stack.client.patch(f"dags/{DAG_ID}/dagRuns/{run['dag_run_id']}", {"state": "failed"})


# ------------------------------------------------------------------------------- waiting
def wait_until(
    stack: Any, what: str, predicate: Callable[[], Any], timeout: float = 180.0, interval: float = 0.3
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with the stack's logs otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"never happened within {timeout:g}s: {what}\n{stack.diagnostics()}")
        time.sleep(interval)


def states(stack: Any, batch: Batch, task: str) -> dict[int, str | None]:
    """Return the state of each mapped instance of ``image.<task>``, by map index."""
    tis = stack.client.task_instances(DAG_ID, batch.run_id)
    return {ti["map_index"]: ti["state"] for ti in tis if ti["task_id"] == f"image.{task}"}


def all_in(stack: Any, batch: Batch, task: str, wanted: Iterable[str], groups: Iterable[int]) -> bool:
    """Tell whether ``image.<task>`` of each of ``groups`` is in one of the ``wanted`` states."""
    found = states(stack, batch, task)
    return all(found.get(group) in set(wanted) for group in groups)


def ti_name(ti: Mapping[str, Any]) -> str:
    """Name a task instance ``task[map index]`` (just ``task`` when not mapped)."""
    return ti["task_id"] + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else "")


# ------------------------------------------------------------------------------- checking
@dataclass
class Figures:
    """What one case did, as printed after it."""

    case: str
    executor: str
    state: str
    wall_seconds: float
    prompts: int
    images_expected: int
    images_archived: int
    submissions_per_prompt: dict[int, int]
    failed_tries: dict[str, list[str]]
    races: set[str] = field(default_factory=set)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def other_failures(self) -> dict[str, list[str]]:
        """The failed tries not explained by Airflow's stale-event race (:data:`STALE_EXIT_EVENT`)."""
        return {name: tries for name, tries in self.failed_tries.items() if name not in self.races}

    def line(self) -> str:
        failed = ", ".join(
            f"{k}: {'/'.join(v)}{' (Airflow stale-event race)' if k in self.races else ''}"
            for k, v in self.failed_tries.items()
        )
        notes = "".join(f"; {k}: {v}" for k, v in self.notes.items())
        return (
            f"[{self.executor}] {self.case}: run {self.state} in {self.wall_seconds:.0f}s; images "
            f"{self.images_archived}/{self.images_expected} archived of {self.prompts} prompts; "
            f"submissions per prompt {dict(sorted(self.submissions_per_prompt.items()))}; "
            f"tries that failed: {failed or 'none'}{notes}"
        )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Return the entries of a JSON-lines file ([] when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary_of(batch: Batch) -> dict[str, Any]:
    """Return the run's ``summary.json`` (``<day>/runs/<run folder>/summary.json``)."""
    found = list((batch.day / "runs").glob("*/summary.json"))
    assert len(found) == 1, f"expected one summary.json under {batch.day / 'runs'}, found {found}"
    summary = json.loads(found[0].read_text())
    assert summary["run_id"] == batch.run_id
    return summary


class ReportedUncertain(AssertionError):
    """A prompt the run reported ``submission_uncertain`` where the test knows the truth."""


def assert_none_uncertain(batch: Batch) -> None:
    """Raise :class:`ReportedUncertain` when the summary reports any prompt ``submission_uncertain``."""
    uncertain = [i["prompt"] for i in summary_of(batch)["images"] if i["outcome"] == "submission_uncertain"]
    if uncertain:
        raise ReportedUncertain(f"reported submission_uncertain: {uncertain} ({lost_in_summary(batch)})")


def lost_in_summary(batch: Batch) -> str:
    """Describe the prompts the run's summary says were lost, with outcome and reason (for a failure)."""
    try:
        images = summary_of(batch)["images"]
    except (AssertionError, OSError, ValueError) as error:
        return f"no summary ({error})"
    lost = [f"{i['prompt']!r}: {i['outcome']} ({i['reason']})" for i in images if i["outcome"] != "success"]
    return "lost " + "; ".join(lost) if lost else "nothing lost"


def verify_batch(
    stack: Any,
    simulator: Any,
    batch: Batch,
    state: str,
    *,
    lost: Mapping[str, str] | None = None,
    killed: Iterable[str] = (),
) -> Figures:
    """
    Check a finished run end to end; return its figures.

    :param state: the run's final state
    :param lost: prompt -> outcome of the prompts expected to end without an image (all others
        must succeed)
    :param killed: the tasks (``task[map index]``) whose process the test killed with
        ``kill_task`` (the scheduler logs their end like a stale event, once each)
    """
    lost = dict(lost or {})
    expected_state = "failed" if lost else "success"
    assert state == expected_state, (
        f"run {batch.run_id} ({batch.name}) ended {state}: {lost_in_summary(batch)}\n{stack.diagnostics()}"
    )
    stats = simulator.stats()
    succeeded = [p for p in batch.prompts if p not in lost]
    manifest = check_manifest(batch, stats, succeeded)
    check_submissions(batch, stats)
    check_summary(batch, lost)
    check_quarantine(batch, lost)
    failed_tries = check_task_states(stack, batch, lost)
    races = set(stale_event_races(stack, batch) - Counter(killed))
    for name in races:  # such a try is failed by the scheduler; the retry must finish the task
        assert failed_tries.get(name, [""])[-1] == "success", (name, failed_tries)
    return Figures(
        case=batch.name,
        executor=batch.executor,
        state=state,
        wall_seconds=batch.wall_seconds,
        prompts=len(batch.prompts),
        images_expected=len(succeeded),
        images_archived=sum(line["source"] == "result" for line in manifest),
        submissions_per_prompt=dict(Counter(stats["submissions"].get(p, 0) for p in batch.prompts)),
        failed_tries=failed_tries,
        races=races,
    )


def check_manifest(batch: Batch, stats: Mapping[str, Any], succeeded: list[str]) -> list[dict[str, Any]]:
    """Check one result and one origin line per successful prompt, each file whole; nothing else kept."""
    images = batch.day / "images"
    lines = read_jsonl(images / "manifest.jsonl")
    keys = Counter((line["remote_task_id"], line["source"]) for line in lines)
    assert not [k for k, n in keys.items() if n > 1], f"manifest lines taken twice: {keys.most_common(3)}"
    assert not [line for line in lines if line.get("superseded_by")], "a manifest line was superseded"
    by_prompt = Counter((line["prompt"], line["source"]) for line in lines)
    assert by_prompt == Counter({(p, s): 1 for p in succeeded for s in ("result", "origin")}), (
        f"manifest lines per (prompt, source) differ: missing "
        f"{[p for p in succeeded if (p, 'result') not in by_prompt]}, extra "
        f"{sorted(k for k in by_prompt if k[0] not in succeeded)}"
    )
    tasks = stats["tasks"]
    for line in lines:
        assert tasks[line["remote_task_id"]]["prompt"] == line["prompt"], line
        check_file(Path(line["path"].removeprefix("file://")), line)
    kept = {Path(line["path"]).name for line in lines}
    present = {p.name for p in images.iterdir() if not p.name.startswith(".")} - {"manifest.jsonl"}
    assert present == kept, f"files not in the manifest: {sorted(present - kept)}; missing: {kept - present}"
    leftovers = [p.name for p in images.iterdir() if p.name.endswith(".partial")]
    assert not leftovers, f"partial writes left behind: {leftovers}"
    return lines


def check_file(path: Path, line: Mapping[str, Any]) -> None:
    """Check that the file exists, has the manifest's size and sha256, and is a valid image."""
    body = path.read_bytes()
    assert len(body) == line["bytes"], path
    assert hashlib.sha256(body).hexdigest() == line["sha256"], path
    Image.open(io.BytesIO(body)).verify()


def check_submissions(batch: Batch, stats: Mapping[str, Any]) -> None:
    """Check each prompt accepted by the API exactly once, nothing else submitted, nothing left held."""
    submitted = stats["submissions"]
    wrong = {p: submitted.get(p, 0) for p in {*batch.prompts, *submitted} if submitted.get(p, 0) != 1}
    assert submitted == dict.fromkeys(batch.prompts, 1), f"prompts not submitted exactly once: {wrong}"
    assert stats["held"] == []


def check_summary(batch: Batch, lost: Mapping[str, str]) -> None:
    """Check that ``summary.json`` counts what happened: successes, each lost outcome, files, credits."""
    summary = summary_of(batch)
    n, successes = len(batch.prompts), len(batch.prompts) - len(lost)
    counts = {k: v for k, v in summary["counts"].items() if v}
    assert counts == dict(Counter(lost.values())) | ({"success": successes} if successes else {}), counts
    assert (summary["prompts"], summary["rejected"], summary["lost"]) == (n, 0, len(lost))
    assert (summary["resubmitted"], summary["reused_from_earlier_run"]) == (0, 0)
    assert summary["archived_files"] == 2 * successes
    assert summary["credits"]["used"] == n * COST_PER_IMAGE  # every submission is charged
    outcomes = {image["prompt"]: image["outcome"] for image in summary["images"]}
    assert outcomes == {p: lost.get(p, "success") for p in batch.prompts}
    for image in summary["images"]:
        assert bool(image["reason"]) == (image["prompt"] in lost), image
        assert image["group"] == batch.group_of(image["prompt"]), image
    report = next((batch.day / "runs").glob("*/report.html")).read_text()
    assert report.count("<img ") == successes
    assert report.count('class="card lost"') == len(lost)


def check_quarantine(batch: Batch, lost: Mapping[str, str]) -> None:
    """Check every lost prompt quarantined once with its outcome and a reason, and no other."""
    entries = read_jsonl(batch.day / "quarantine.jsonl")
    assert {e["prompt"]: e["outcome"] for e in entries} == dict(lost)
    assert len(entries) == len(lost)
    assert all(e["message"] for e in entries), entries


def check_task_states(stack: Any, batch: Batch, lost: Mapping[str, str]) -> dict[str, list[str]]:
    """Check every task ended as the outcomes say; return the tries that failed on the way."""
    tis = stack.client.task_instances(DAG_ID, batch.run_id)
    final = {ti_name(ti): ti["state"] for ti in tis}
    red = {batch.group_of(p) for p in lost}
    expected = {"read_prompts": "success", "report": "failed" if lost else "success"}
    for group in range(batch.groups):
        expected |= {f"image.generate[{group}]": "success", f"image.archive[{group}]": "success"}
        expected[f"image.settle[{group}]"] = "failed" if group in red else "success"
    assert final == expected, {k: (final.get(k), v) for k, v in expected.items() if final.get(k) != v}
    labels = {ti["map_index"]: ti["rendered_map_index"] for ti in tis if ti["task_id"] == "image.generate"}
    for group in range(batch.groups):
        first = group * batch.chunk_size + 2  # CSV line of the group's first prompt
        assert labels[group].startswith(f"lines {first}-"), labels
    return failed_tries(stack, batch, tis)


def failed_tries(stack: Any, batch: Batch, tis: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Return ``{"task[map index]": [state of each try]}`` for every task instance that failed a try."""
    found = {}
    for ti in tis:
        if ti["try_number"] > 1 or ti["state"] == "failed":
            tries = stack.client.tries(DAG_ID, batch.run_id, ti["task_id"], ti["map_index"])
            found[ti_name(ti)] = [str(t["state"]) for t in tries]
    return found


def stale_event_races(stack: Any, batch: Batch) -> Counter[str]:
    """Count the tries of each task of the run the scheduler failed on a "success" it did not expect."""
    log = stack.log_path("scheduler").read_text(errors="replace")
    pattern = re.compile(rf"{DAG_ID}\.(\S+) {re.escape(batch.run_id)}(?: map_index=(\d+))? \[")
    found: Counter[str] = Counter()
    for line in log.splitlines():
        hit = pattern.search(line) if STALE_EXIT_EVENT in line else None
        if hit:
            found[hit[1] + (f"[{hit[2]}]" if hit[2] is not None else "")] += 1
    return found


def report_case(config: pytest.Config, figures: Figures) -> None:
    """Print a case's figures at once, captured output or not (the CI log shows every case)."""
    say(config, figures.line())


def say(config: pytest.Config, text: str) -> None:
    """Write lines to the terminal now, past pytest's output capture."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:  # pragma: no cover - plugins turned off
        print(text)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for line in text.splitlines():
            reporter.write_line(line)
