"""
Two submitting tasks at once share the account's limit, on Local and on Celery.

The pool ``imagecb_submissions`` gets 2 slots and the connection ``submission_slots: 2``: each
generate task paces at half the account's 40 per 10 s. The simulator refuses (429) anything over
40 in 10 s, so a task pacing at the whole rate beside another would be refused; here none is,
while two groups' submissions overlap in time.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from batch_checks import SHARED_CONN_ID, finish, new_batch, prepare_simulator, trigger, verify_batch

from imagecb_provider.callbacks.db import SUBMISSION_POOL_DESCRIPTION
from imagecb_provider.utils.pacing import SUBMISSION_POOL

pytestmark = [pytest.mark.stack, pytest.mark.timeout(900)]


def _overlapping_groups(stats: dict[str, Any], prompts: list[str], chunk_size: int) -> int:
    """How many pairs of groups had their submissions in flight over the same seconds."""
    spans: dict[int, list[float]] = {}
    group_of = {p: i // chunk_size for i, p in enumerate(prompts)}
    for task in stats["tasks"].values():
        if task["prompt"] in group_of:
            at = datetime.fromisoformat(task["submitted_at"].replace("Z", "+00:00")).timestamp()
            spans.setdefault(group_of[task["prompt"]], []).append(at)
    ranges = sorted((min(v), max(v)) for v in spans.values())
    return sum(a[1] > b[0] for n, a in enumerate(ranges) for b in ranges[n + 1 :])


@pytest.mark.parametrize("executor", ["LocalExecutor", "CeleryExecutor"])
def test_two_slots_each_at_half_the_rate_submit_at_once_and_never_meet_a_429(
    executor: str, request: pytest.FixtureRequest, batch_simulator: Any, tmp_path: Path
) -> None:
    stack = request.getfixturevalue(
        "batch_local_stack" if executor == "LocalExecutor" else "batch_celery_stack"
    )
    prepare_simulator(batch_simulator)
    batch = new_batch(
        tmp_path, f"shared-{executor[:5].lower()}", n=48, chunk_size=12, imagecb_conn_id=SHARED_CONN_ID
    )
    stack.client.set_pool(SUBMISSION_POOL, slots=2, description=SUBMISSION_POOL_DESCRIPTION)
    try:
        trigger(stack, batch)
        state = finish(stack, batch)
    finally:
        stack.client.set_pool(SUBMISSION_POOL, slots=1, description=SUBMISSION_POOL_DESCRIPTION)

    figures = verify_batch(stack, batch_simulator, batch, state)
    stats = batch_simulator.stats()
    assert stats["rejected"].get("429", 0) == 0  # the account's 40 per 10 s held across both tasks
    assert figures.submissions_per_prompt == {1: 48}
    assert _overlapping_groups(stats, batch.prompts, batch.chunk_size) >= 1  # the two slots were used
