"""
The OpenLineage facets of the imagecb operators, built in one place.

The operators' ``get_openlineage_facets_on_complete`` methods (called by the OpenLineage provider
on success, and on failure too) import this module lazily, so the provider works without
``apache-airflow-providers-openlineage`` installed. What the events say:

Generate tasks (``ImageGenerateOperator``, ``ImageBatchGenerateOperator``, ``@task.imagecb``)
    *inputs*: the task's inlet assets with a URL (e.g. the prompt file) and one dataset per
    request: namespace ``imagecb://<connection id>``, name ``request/<request fingerprint>``, the
    prompt as its documentation facet. *Run facet* ``imagecb``: per request, the remote task id,
    its outcome and message, and the remote tasks it replaced (read from the submission ledger).
Archive tasks (``ImageArchiveOperator``)
    *inputs*: the request datasets of the results it archived; *output*: the destination folder
    (namespace ``file``, ``s3://<bucket>``, ``gs://<bucket>`` as OpenLineage names object storage)
    with the number and size of the new files. *Run facet* ``imagecb``: per result, the remote
    task id, its outcome and its files (path, sha256, new or kept before), the manifest.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar
from urllib.parse import urlsplit

from airflow.providers.common.compat.openlineage.facet import (
    DocumentationDatasetFacet,
    InputDataset,
    OutputDataset,
    OutputStatisticsOutputDatasetFacet,
    RunFacet,
)
from airflow.providers.openlineage.extractors import OperatorLineage
from airflow.sdk import Asset
from attrs import define, field

from imagecb_provider.batch.archive import ArchiveRun
from imagecb_provider.exceptions import InvalidGenerationRequest
from imagecb_provider.models import GenerationRequest, request_key
from imagecb_provider.utils.ledger import LedgerEntry, SubmissionLedger

log = logging.getLogger(__name__)

#: The key of the run facet in every event of an imagecb task.
RUN_FACET_KEY = "imagecb"
REQUEST_NAMESPACE = "imagecb://{conn_id}"


@define
class ImagecbRunFacet(RunFacet):
    """
    What an imagecb task did at the image API: the remote tasks, their outcomes, the files kept.

    :param operation: ``generate`` or ``archive``.
    :param connId: the ``imagecb`` connection the task used.
    :param tasks: one entry per remote task: ``remoteTaskId``, ``outcome``, ``message``,
        ``requestKey``; for generate tasks ``earlier`` (the remote tasks a resubmission
        replaced), for archive tasks ``files`` (``path``, ``sha256``, ``new``).
    :param outcomes: how many of ``tasks`` ended with each outcome (``submitted`` while waiting).
    :param destination: archive tasks: the destination folder.
    :param manifest: archive tasks: the manifest's path.
    """

    operation: str
    connId: str
    tasks: list[dict[str, Any]] = field(factory=list)
    outcomes: dict[str, int] = field(factory=dict)
    destination: str | None = None
    manifest: str | None = None

    _additional_skip_redact: ClassVar[list[str]] = ["operation", "connId", "outcomes"]


# ------------------------------------------------------------------------------- datasets
def location_dataset(url: str, dataset_class: type[InputDataset] | type[OutputDataset], **facets: Any) -> Any:
    """
    A dataset for a file or folder URL, named as OpenLineage names object storage.

    ``file:///data/x`` (or ``/data/x``) is namespace ``file``, name ``/data/x``;
    ``s3://bucket/key`` is namespace ``s3://bucket``, name ``key``; likewise ``gs://``.
    """
    if "://" not in url:
        url = f"file://{os.path.abspath(os.path.expanduser(url))}"
    parts = urlsplit(url)
    if parts.scheme in ("file", "local"):
        namespace = f"file://{parts.netloc}" if parts.netloc else "file"
        name = parts.path.rstrip("/") or "/"
    else:
        namespace = f"{parts.scheme}://{parts.netloc}"
        name = parts.path.strip("/") or "/"
    return dataset_class(namespace=namespace, name=name, **facets)


def request_dataset(conn_id: str, payload: Mapping[str, Any]) -> InputDataset:
    """The input dataset of one request: its fingerprint, with its prompt as documentation."""
    facets = {}
    if payload.get("prompt"):
        facets["documentation"] = DocumentationDatasetFacet(description=str(payload["prompt"]))
    return InputDataset(
        namespace=REQUEST_NAMESPACE.format(conn_id=conn_id),
        name=f"request/{request_key(payload)}",
        facets=facets,
    )


def inlet_datasets(inlets: Iterable[Any]) -> list[InputDataset]:
    """The task's inlet assets that have a URL (a prompt file, say), as input datasets."""
    return [
        location_dataset(inlet.uri, InputDataset)
        for inlet in inlets
        if isinstance(inlet, Asset) and "://" in (inlet.uri or "")
    ]


# --------------------------------------------------------------------------- generate tasks
def generation_lineage(
    *,
    conn_id: str,
    inlets: Iterable[Any],
    requests: Callable[[], Iterable[GenerationRequest]],
    task_instance: Any,
) -> OperatorLineage:
    """
    Describe a generate task: its inlets and requests in, its remote tasks as the run facet.

    The remote tasks and outcomes come from the task's submission ledger, so a failed task (an
    outcome raised as an error) is described as fully as a successful one.

    :param conn_id: the task's ``imagecb`` connection.
    :param inlets: the task's inlets.
    :param requests: gives the task's rendered requests (it raises when one is invalid).
    :param task_instance: the task instance the OpenLineage listener passes.
    """
    conn_id = conn_id
    payloads = _payloads(requests)
    keys = {request_key(payload) for payload in payloads}
    entry = _ledger_entry(task_instance)
    tasks = [_slot_task(slot) for slot in (entry.slots if entry else []) if slot.key in keys]
    facet = ImagecbRunFacet(
        operation="generate",
        connId=conn_id,
        tasks=tasks,
        outcomes=dict(Counter(task["outcome"] for task in tasks)),
    )
    inputs = [*inlet_datasets(inlets), *(request_dataset(conn_id, p) for p in payloads)]
    return OperatorLineage(inputs=inputs, run_facets={RUN_FACET_KEY: facet})


def _payloads(requests: Callable[[], Iterable[GenerationRequest]]) -> list[dict[str, Any]]:
    """The requests' payloads as the ledger fingerprints them; none when a request is invalid."""
    try:
        return [r.to_payload(include_callback=False) for r in requests()]
    except InvalidGenerationRequest:
        return []


def _ledger_entry(task_instance: Any) -> LedgerEntry | None:
    """The task's submission ledger, read through its supervisor (``None`` when it cannot be)."""
    if not _supervisor_reachable():
        log.warning(
            "The submission ledger cannot be read from a process forked off an in-process supervisor "
            "(dag.test, airflow dags test): set [openlineage] execute_in_thread = True there to see the "
            "remote tasks in the lineage"
        )
        return None
    try:
        return SubmissionLedger(task_instance.get_template_context()).load()
    except Exception:  # lineage must never fail the listener: describe what can be described
        log.warning("Could not read the submission ledger for OpenLineage", exc_info=True)
        return None


def _supervisor_reachable() -> bool:
    """
    Whether this process can ask the task's supervisor for its state.

    The OpenLineage listener extracts in a child process forked off the task (unless
    ``[openlineage] execute_in_thread``). On a worker the child reaches the supervisor through
    the inherited socket; under ``dag.test()`` the supervisor lives in the task's own process and
    serves requests from a thread that the fork does not copy, so a request would never return.
    """
    from airflow.providers.openlineage import conf
    from airflow.sdk.execution_time import task_runner

    comms = getattr(task_runner, "SUPERVISOR_COMMS", None)
    return type(comms).__name__ != "InProcessSupervisorComms" or conf.execute_in_thread()


def _slot_task(slot: Any) -> dict[str, Any]:
    return {
        "remoteTaskId": slot.remote_task_id,
        "outcome": slot.outcome or "submitted",
        "message": slot.message,
        "requestKey": slot.key,
        "earlier": [
            {"remoteTaskId": e.get("remote_task_id"), "outcome": e.get("outcome")} for e in slot.earlier
        ],
    }


# ---------------------------------------------------------------------------- archive tasks
def archive_lineage(*, conn_id: str, destination: str, run: ArchiveRun | None) -> OperatorLineage:
    """
    Describe an archive task: the archived requests in, the destination folder out.

    :param conn_id: the task's ``imagecb`` connection.
    :param destination: the rendered destination folder.
    :param run: what the run did; ``None`` when it failed before archiving (then only the
        destination is described).
    """
    if run is None:
        output = location_dataset(destination, OutputDataset)
        facet = ImagecbRunFacet(operation="archive", connId=conn_id)
        return OperatorLineage(outputs=[output], run_facets={RUN_FACET_KEY: facet})
    statistics = OutputStatisticsOutputDatasetFacet(
        fileCount=len(run.new_files), size=sum(f.bytes for f in run.new_files)
    )
    output = location_dataset(run.destination, OutputDataset, outputFacets={"outputStatistics": statistics})
    tasks = [_archived_task(result, run) for result in run.results]
    facet = ImagecbRunFacet(
        operation="archive",
        connId=conn_id,
        tasks=tasks,
        outcomes=dict(Counter(task["outcome"] for task in tasks)),
        destination=run.destination,
        manifest=run.manifest,
    )
    archived = [r for r in run.results if r.get("outcome") == "success" and r.get("request")]
    inputs = [request_dataset(conn_id, r["request"]) for r in archived]
    return OperatorLineage(inputs=inputs, outputs=[output], run_facets={RUN_FACET_KEY: facet})


def _archived_task(result: Mapping[str, Any], run: ArchiveRun) -> dict[str, Any]:
    new = {(f.remote_task_id, f.source) for f in run.new_files}
    files = [
        {"path": f.path, "sha256": f.sha256, "new": (f.remote_task_id, f.source) in new}
        for f in run.files
        if f.remote_task_id == result.get("task_id")
    ]
    return {
        "remoteTaskId": result.get("task_id"),
        "outcome": result.get("outcome"),
        "message": result.get("message") or "",
        "requestKey": request_key(result.get("request") or {}),
        "files": files,
    }
