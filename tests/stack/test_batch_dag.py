"""
The main job, ``imagecb_batch_generate``, end to end on a real stack: separate API server,
scheduler, DAG processor and triggerer on PostgreSQL, with the LocalExecutor and with the
CeleryExecutor (Redis broker, a Celery worker), against the simulator in its own process.

A batch of 30 prompts in 4 groups (3 s renders, a status call a second): every image archived
once with valid files, each prompt submitted once, the report's counts right, and nothing failed
on the way (each group's generate task submits, defers once and resumes once, in one try).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from batch_checks import (
    DAG_ID,
    Figures,
    finish,
    new_batch,
    prepare_simulator,
    report_case,
    summary_of,
    ti_name,
    trigger,
    verify_batch,
)

pytestmark = [pytest.mark.stack, pytest.mark.timeout(900)]


def run_baseline(stack: Any, simulator: Any, folder: Path, name: str) -> Figures:
    """Run a batch with nothing injected; check it end to end and that no try failed."""
    prepare_simulator(simulator)
    batch = new_batch(folder, name)
    trigger(stack, batch)
    state = finish(stack, batch)
    figures = verify_batch(stack, simulator, batch, state)
    assert figures.other_failures == {}
    tis = stack.client.task_instances(DAG_ID, batch.run_id)
    assert {ti["try_number"] for ti in tis if ti_name(ti) not in figures.races} == {1}
    assert len(tis) == 2 + 3 * batch.groups
    summary = summary_of(batch)
    assert summary["durations"]["batch_seconds"] > 0
    assert all(image["seconds"] is not None for image in summary["images"])
    return figures


def test_batch_on_local_executor(
    batch_local_stack: Any, batch_simulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Run the batch on the LocalExecutor stack with nothing injected."""
    report_case(request.config, run_baseline(batch_local_stack, batch_simulator, tmp_path, "local-baseline"))


def test_batch_on_celery_executor(
    batch_celery_stack: Any, batch_simulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Run the batch on the CeleryExecutor stack (Redis broker, a Celery worker) with nothing injected."""
    figures = run_baseline(batch_celery_stack, batch_simulator, tmp_path, "celery-baseline")
    report_case(request.config, figures)
