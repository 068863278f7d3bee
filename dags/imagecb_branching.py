"""
Route each image by how it ended: one mapped task group ``image`` per prompt, in which
``ImageOutcomeBranchOperator`` sends the result of ``generate`` (``failure_mode="return"``, so a
failed image is a result, not a failed task) down one branch for that prompt only: ``success``
goes to ``archive``; ``content_policy`` to ``rewrite``, which softens the prompt with the
replacements in param ``softer_words`` and hands it to ``regenerate`` for one more submission;
``internal_error`` to ``resubmit``, which submits the same prompt again; ``generation_failed``,
``timeout`` and ``submission_uncertain`` to ``quarantine``, which records the prompt and its reason
in ``<archive_root>/quarantine.jsonl``. ``archive`` also keeps the images of the second
submissions, so every image made lands in ``<archive_root>/images`` (with its ``manifest.jsonl``).
The default prompts carry the markers of the simulator (``[sim:...]``, see the README of
``imagecb_provider.testing.simulator``) so that a run against it takes every route; against the
real API, pass your own ``prompts``. Nothing is read or sent at parse time.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Param, dag, task, task_group

from imagecb_provider.operators.archive import ImageArchiveOperator
from imagecb_provider.operators.branch import ImageOutcomeBranchOperator
from imagecb_provider.operators.generate import ImageGenerateOperator

DEFAULT_PROMPTS = [
    "a lighthouse on a cliff at dawn, watercolor",
    "a gory battle scene, oil painting [sim:content_policy]",
    "a paper boat on a rainy street [sim:flaky]",
    "a city skyline made of books [sim:generation_failed]",
]
#: Against the simulator, the marker is what gets a prompt flagged: dropping it is the softening.
DEFAULT_SOFTER_WORDS = {"gory": "dramatic", "[sim:content_policy]": ""}
CONN_ID = "{{ params.imagecb_conn_id }}"
POLL_INTERVAL = "{{ params.poll_interval }}"
TIMEOUT = "{{ params.timeout }}"


@dag(
    dag_id="imagecb_branching",
    description="Generate one image per prompt and route each by its outcome: archive, rewrite, "
    "resubmit or quarantine",
    doc_md=__doc__,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["imagecb", "example", "branching"],
    default_args={"owner": "imagecb", "retries": 2, "retry_delay": timedelta(seconds=30)},
    params={
        "prompts": Param(
            DEFAULT_PROMPTS,
            type="array",
            items={"type": "string", "minLength": 1},
            minItems=1,
            description="One image per prompt, each routed by its own outcome",
        ),
        "archive_root": Param(
            "/tmp/imagecb-branching",
            type="string",
            description="Folder or URL (s3://…): images/ and quarantine.jsonl go there",
        ),
        "softer_words": Param(
            DEFAULT_SOFTER_WORDS,
            type="object",
            description="Replacements made in a prompt the content policy flagged, before it is "
            "submitted once more",
        ),
        "poll_interval": Param(30, type="number", minimum=0.1, description="Seconds between status calls"),
        "timeout": Param(1800, type="number", minimum=1, description="Seconds one image may take"),
        "imagecb_conn_id": Param("imagecb_default", type="string"),
    },
)
def imagecb_branching():
    @task
    def read_prompts(params: dict[str, Any]) -> list[str]:
        """The prompts to map the group over, one map index each."""
        return list(params["prompts"])

    @task
    def rewrite(result: dict[str, Any], params: dict[str, Any]) -> str:
        """The flagged prompt, softened with ``softer_words``; fails when there is nothing to soften."""
        import re

        from airflow.sdk.exceptions import AirflowFailException

        prompt = result["prompt"]
        softened = prompt
        for word, softer in params["softer_words"].items():
            softened = re.sub(re.escape(word), softer, softened, flags=re.IGNORECASE)
        softened = " ".join(softened.split()).strip(" ,")
        if not softened or softened == prompt:
            raise AirflowFailException(
                f"Nothing in {prompt!r} to soften with softer_words {sorted(params['softer_words'])}: "
                "add the words it was flagged for"
            )
        print(f"Rewrote {prompt!r} as {softened!r}")
        return softened

    @task
    def quarantine(result: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """Record the prompt and why it has no image in ``<archive_root>/quarantine.jsonl`` (once)."""
        from imagecb_provider.batch.archive import JsonlLedger, storage_path
        from imagecb_provider.batch.report import lost_entry

        entry = lost_entry(result)
        path = storage_path(params["archive_root"]) / "quarantine.jsonl"
        JsonlLedger(path, key_fields=("request_key", "task_id")).add([entry])
        print(f"Quarantined {entry['prompt']!r}: {entry['outcome']} ({entry['message']}) in {path}")
        return entry

    # [START howto_branching]
    @task_group(group_id="image")
    def image(prompt: str):
        generate = ImageGenerateOperator(
            task_id="generate",
            prompt=prompt,
            failure_mode="return",  # a failed image is a result to route, not a failed task
            poll_interval=POLL_INTERVAL,
            timeout=TIMEOUT,
            imagecb_conn_id=CONN_ID,
        )
        route = ImageOutcomeBranchOperator(
            task_id="route",
            result=generate.output,
            branches={
                "success": "archive",
                "content_policy": "rewrite",
                "internal_error": "resubmit",
                "generation_failed": "quarantine",
                "timeout": "quarantine",
                "submission_uncertain": "quarantine",
            },
        )
        rewritten = rewrite(generate.output)
        regenerate = ImageGenerateOperator(
            task_id="regenerate",
            prompt=rewritten,
            poll_interval=POLL_INTERVAL,
            timeout=TIMEOUT,
            imagecb_conn_id=CONN_ID,
        )
        resubmit = ImageGenerateOperator(
            task_id="resubmit",
            prompt=prompt,
            poll_interval=POLL_INTERVAL,
            timeout=TIMEOUT,
            imagecb_conn_id=CONN_ID,
        )
        # Also below the second submissions (a join), so it keeps whichever image this prompt got.
        # "none_failed", not "none_failed_min_one_success": in a mapped task group Airflow makes
        # a not-yet-expanded task with a "one success" rule wait for every map index.
        archive = ImageArchiveOperator(
            task_id="archive",
            results=[generate.output, regenerate.output, resubmit.output],
            destination="{{ params.archive_root }}/images",
            imagecb_conn_id=CONN_ID,
            trigger_rule="none_failed",
        )
        route >> [archive, rewritten, resubmit, quarantine(generate.output)]

    image.expand(prompt=read_prompts())
    # [END howto_branching]


imagecb_branching()
