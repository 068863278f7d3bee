"""
Submitting requests and settling their outcomes, never paying for an image twice.

Shared by :class:`~imagecb_provider.operators.generate.ImageGenerateOperator` (one request) and
:class:`~imagecb_provider.operators.generate.ImageBatchGenerateOperator` (many). Every
submission is recorded in the task instance's :class:`SubmissionLedger` before the wait starts,
so a later try reconnects instead of submitting again (see :func:`plan_slots` for the rule), and
a request is marked ``sending`` before it goes out, so a submission whose answer was lost is
reported, never resent. An answer that is not the API's (no envelope, or a task id not of the
strict form) counts as lost: the request may have been accepted and charged. An answer whose code
says how the generation ended (501, or 408 to a submission) created nothing: the request ends with
that outcome, without a remote task, and the next try sends it again. A remote task the API no
longer knows, in any of the forms it says so, is retired from its slot (:func:`_fail_on_error`).

An input image that is a file (a path, an object-store URL) is read, checked and uploaded right
before its request is sent (:class:`InputImages`), once per content while its link lives; a file
that is refused or an upload that fails ends that request ``upload_failed`` before anything is
sent, so no credit is spent, and the next try uploads it again.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from imagecb_provider.exceptions import (
    ImageCbApiError,
    ImageCbAuthenticationError,
    ImageCbConnectionError,
    ImageCbOutcomeAnswer,
    ImageCbProtocolError,
    ImageCbRateCapped,
    ImageCbRateLimited,
    ImageCbSubmissionUncertain,
    InputImageUnavailable,
    InvalidInputImage,
    InvalidRemoteTaskId,
)
from imagecb_provider.hooks.protocol import RETRYABLE_ERRORS, without_query
from imagecb_provider.models import (
    GenerationRequest,
    Outcome,
    TaskRecord,
    build_result,
    parse_timestamp,
    remote_task_id,
    request_key,
    to_iso,
)
from imagecb_provider.triggers.task import EVENT_ERROR
from imagecb_provider.utils.inputs import UploadCache, display_name, is_http_url, read_input_image
from imagecb_provider.utils.ledger import (
    Action,
    LedgerEntry,
    LedgerWriter,
    Slot,
    SubmissionLedger,
    plan_slots,
)
from imagecb_provider.utils.limiter import ACCOUNT_REFUSALS, AccountHold, AccountLimiter
from imagecb_provider.utils.pacing import DEFAULT_MAX_IN_FLIGHT, in_flight
from imagecb_provider.utils.waiting import (
    WaitingTask,
    check_bool,
    check_positive,
    check_wait_mode,
    error_from_event,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

    from imagecb_provider.hooks.imagecb import ImageCbHook


class GeneratingTask(WaitingTask, Protocol):
    """What :class:`GenerationMixin` needs of the operator it is mixed into."""

    poll_interval: Any
    timeout: Any
    retries: int
    resubmit_outcomes: Sequence[str]
    reuse_successes: bool
    raise_invalid_input: bool
    max_in_flight: int

    @property
    def hook(self) -> ImageCbHook: ...

    def generation_requests(self) -> list[GenerationRequest]: ...

    def wait_for_remote_tasks(
        self, context: Context, remote_task_ids: Sequence[str], **kwargs: Any
    ) -> Any: ...

    def log_outcome(self, result: dict[str, Any]) -> None: ...

    def deliver(self, results: list[dict[str, Any]]) -> list[dict[str, Any]]: ...

    def present(self, results: list[dict[str, Any]]) -> Any: ...


def is_new_run(context: Context) -> bool:
    """Whether this is the first try of a run or of a rerun cleared from the UI (not a retry)."""
    ti, task = context.get("ti"), context.get("task")
    if ti is None or task is None:
        return True
    # Clearing sets max_tries to try_number + retries: Airflow's own "first try of this epoch".
    return ti.try_number == ti.max_tries - task.retries + 1


class GenerationMixin:
    """Submit the task's requests, wait for them, resubmit once on chosen outcomes, settle."""

    #: A refused input image (missing, not an image, too large) raises
    #: :class:`~imagecb_provider.exceptions.InvalidInputImage`, failing the task at once, when
    #: true (one request: nothing else goes on); when false it ends its request ``upload_failed``.
    raise_invalid_input = False
    #: The most submissions of the task waiting for their answers at once (when the account's
    #: rate allows more than one in :data:`~imagecb_provider.utils.pacing.IN_FLIGHT_WINDOW`):
    #: also the most a crash can leave ``submission_uncertain``.
    max_in_flight = DEFAULT_MAX_IN_FLIGHT

    # ------------------------------------------------------------------ the first half
    def generate(self: GeneratingTask, context: Context, *, submit: bool = True) -> Any:
        """
        Plan every request against the ledger, submit what must be, then wait for all of them.

        :param submit: ``False`` only plans and submits, without waiting (``wait_for_completion``).
        """
        check_wait_mode(self.wait_mode)
        self.deferrable = check_bool("deferrable", self.deferrable)
        requests = self.generation_requests()  # a bad rendered value fails here, before any credit
        ledger = SubmissionLedger(context)
        if not ledger.available:
            self.log.warning(
                "task_state_store is not available: a retry of this task cannot reconnect to the "
                "images already submitted and will submit (and pay for) new ones"
            )
        keys = [request_key(r.to_payload(include_callback=False)) for r in requests]
        slots, actions = plan_slots(
            ledger.load(), keys, reuse_successes=self.reuse_successes, new_run=is_new_run(context)
        )
        entry = LedgerEntry(slots=slots)
        self._log_plan(actions)
        for slot, action in zip(slots, actions, strict=True):
            if action == Action.UNCERTAIN:
                _settle_planned_uncertain(slot)
            elif action == Action.RECONNECT:
                slot.outcome = None
            else:
                slot.retire()
                slot.resubmits = 0
        to_submit = [i for i, action in enumerate(actions) if action == Action.SUBMIT]
        self._submit(context, requests, entry, to_submit, ledger)
        if not submit:
            entry.finished = True
            ledger.save(entry)
            return entry
        reconnect = {i for i, action in enumerate(actions) if action == Action.RECONNECT}
        return self._wait(context, entry, reconnect)

    def _log_plan(self: GeneratingTask, actions: list[Action]) -> None:
        counts = {a: actions.count(a) for a in Action if actions.count(a)}
        if counts.get(Action.RECONNECT) or counts.get(Action.UNCERTAIN):
            self.log.info(
                "Earlier submissions found: %d reconnected to, %d submitted anew, %d uncertain (not resent)",
                counts.get(Action.RECONNECT, 0),
                counts.get(Action.SUBMIT, 0),
                counts.get(Action.UNCERTAIN, 0),
            )

    def _submit(
        self: GeneratingTask,
        context: Context,
        requests: list[GenerationRequest],
        entry: LedgerEntry,
        indexes: list[int],
        ledger: SubmissionLedger,
    ) -> None:
        """
        Send ``requests[i]`` for each index, paced, recording each before and after it goes out.

        Up to :func:`~imagecb_provider.utils.pacing.in_flight` requests wait for their answers at
        once, each in its own thread, their ledger writes grouped (:class:`LedgerWriter`).
        """
        if not indexes:
            return
        settings = self.hook.settings
        callback_urls = _callback_urls(self, context, settings, indexes)
        limiter = AccountLimiter(self.hook)
        writer = LedgerWriter(ledger, entry)
        window = _Window(self, limiter, writer, in_flight(limiter.pacer.interval, self.max_in_flight))
        window.hold = limiter.admit()
        inputs = InputImages(self, context)
        waiting = deque(indexes)
        with ThreadPoolExecutor(max_workers=window.size, thread_name_prefix="imagecb-submit") as pool:
            try:
                while True:
                    while (
                        waiting
                        and window.hold is None
                        and window.error is None
                        and window.active < window.size
                    ):
                        i = waiting.popleft()
                        request = (
                            requests[i].with_callback(callback_urls[i]) if i in callback_urls else requests[i]
                        )
                        try:
                            # An input image that is a file goes as its upload link; if it cannot,
                            # its slot is settled upload_failed and nothing is sent.
                            request = inputs.linked(request, entry.slots[i])
                        except InputImageNotUploaded:
                            writer.commit()
                            continue
                        window.active += 1
                        pool.submit(window.send, request, entry.slots[i])
                    if not window.active:
                        break
                    writer.serve()  # the threads' marks and answers, written together
            finally:
                window.stopping = True  # a thread not yet sent sends nothing now
                while window.active:  # the threads' last marks and answers are still stored
                    with contextlib.suppress(Exception):  # what raised first is what the task raises
                        writer.serve()
        if window.error is not None:
            raise window.error
        hold = window.hold
        if hold is not None:
            # Credits ran out, or a cap: stop here instead of meeting it once per request.
            writer.commit(lambda: [_settle_not_sent(entry.slots[j], hold) for j in waiting])
            self.log.warning(
                "Submitted %d of %d request(s); %d not sent: %s",
                window.sent,
                len(indexes),
                len(indexes) - window.sent,
                hold.describe(),
            )
            return
        writer.commit()
        self.log.info(
            "Submitted %d of %d request(s) (up to %d in flight, %d ledger writes)",
            window.sent,
            len(indexes),
            window.size,
            writer.writes,
        )

    def _submit_one(
        self: GeneratingTask, request: GenerationRequest, slot: Slot, writer: LedgerWriter
    ) -> None:
        """
        Send one request, its ``sending`` mark stored only while it is really in flight.

        The hook's transient-error retries run here, one attempt at a time: the mark is cleared
        (and stored) before each backoff, so a task killed while it waits to resend a refused
        request lets its retry send it, and only a request whose answer was lost stays uncertain.
        The answer, the remote task id, is stored at once; an answer that cannot be used (not
        the API's envelope, or a task id not of the strict form) settles the slot as uncertain.
        Every change to the slot goes through ``writer``: other threads store the entry meanwhile.
        """

        def mark() -> None:
            slot.sending, slot.sending_since = True, to_iso(datetime.now(UTC))

        def clear() -> None:
            slot.sending = False

        def attempt() -> str:
            writer.commit(mark)  # the mark is stored before the request leaves
            try:
                # Checked here too, whatever the hook checks: this id becomes a URL part and a file name.
                return remote_task_id(self.hook.submit(request, retry=False), "the submit answer")
            except (ImageCbApiError, ImageCbConnectionError):
                # Refused with an error answer, or never sent: nothing was created. Anything
                # else (the task killed mid-request) leaves the mark: uncertain.
                writer.commit(clear)
                raise

        try:
            answer = self.hook.retry_policy.retrying(RETRYABLE_ERRORS)(attempt)
        except ImageCbRateLimited as error:
            # Refused through every attempt (over 30 s, three windows of the documented limit):
            # not a burst but a cap. Nothing was created: the slot is left unsent.
            raise ImageCbRateCapped(
                error.code, error.msg, error.endpoint, retry_after=error.retry_after
            ) from error
        except ImageCbSubmissionUncertain as error:
            cause = f"Sent, but no answer came back ({type(error.__cause__).__name__})"
            # The stored mark already makes it uncertain: the next write stores the reason.
            writer.commit(lambda: _settle_uncertain(slot, cause), durable=False)
            return
        except ImageCbProtocolError as error:
            # The API took the request (an answer came) but its task id cannot be trusted or is
            # missing: it may be charged, so it is settled uncertain now, never resent by a retry.
            cause = f"Sent, but its answer could not be used ({str(error).rstrip('.')})"
            writer.commit(lambda: _settle_uncertain(slot, cause))
            return
        except ImageCbOutcomeAnswer as error:
            # Answered 501 (or 408): no taskId, nothing created, and the hook did not resend it.
            # The request ends with that outcome now; the next try sends it again.
            writer.commit(lambda answer=error: _settle_answered(slot, answer))
            return

        def answered() -> None:
            slot.remote_task_id, slot.sending = answer, False
            slot.submitted_at = to_iso(datetime.now(UTC))

        writer.commit(answered)

    def _wait(self: GeneratingTask, context: Context, entry: LedgerEntry, poll_now: set[int]) -> Any:
        waiting = [i for i, s in enumerate(entry.slots) if s.remote_task_id and s.outcome is None]
        if not waiting:
            return self._finish(context, entry)
        poll_interval = check_positive("poll_interval", self.poll_interval)
        now = time.time()
        return self.wait_for_remote_tasks(
            context,
            [entry.slots[i].remote_task_id for i in waiting],
            poll_interval=poll_interval,
            timeout=check_positive("timeout", self.timeout),
            first_poll_at={entry.slots[i].remote_task_id: now for i in waiting if i in poll_now},
            submitted_at=_submitted_times(entry.slots[i] for i in waiting),
            echo=entry.to_dict(),
        )

    # ----------------------------------------------------------------- the second half
    def execute_complete(self: GeneratingTask, context: Context, event: dict[str, Any]) -> Any:
        """Resume after the trigger fired: record the outcomes, resubmit once if asked, settle."""
        entry = LedgerEntry.from_dict(event["echo"])
        for slot in entry.slots:  # the echo went through the triggerer's database: checked again
            if slot.remote_task_id is not None:
                remote_task_id(slot.remote_task_id, "the trigger event")
        ledger = SubmissionLedger(context)
        waited = [s for s in entry.slots if s.remote_task_id in event["polls"]]
        for slot in waited:
            slot.polls += int(event["polls"][slot.remote_task_id])
            record = event["records"].get(slot.remote_task_id)
            if record is not None:
                _settle(slot, TaskRecord.from_dict(record), event["via"].get(slot.remote_task_id, "poll"))
        if event["status"] == EVENT_ERROR:
            return _fail_on_error(entry, ledger, event["error"])
        for slot in waited:
            if slot.outcome is None:  # still generating at the deadline
                slot.outcome, slot.message = Outcome.TIMEOUT.value, ""
        again = [
            i
            for i, s in enumerate(entry.slots)
            if s.outcome in self.resubmit_outcomes and s.resubmits < 1 and s.remote_task_id
        ]
        if again:
            return self._resubmit(context, entry, ledger, again)
        return self._finish(context, entry, ledger)

    def _resubmit(
        self: GeneratingTask, context: Context, entry: LedgerEntry, ledger: SubmissionLedger, again: list[int]
    ) -> Any:
        self.log.info(
            "Resubmitting %d request(s) once: %s",
            len(again),
            ", ".join(f"{entry.slots[i].remote_task_id} ended with {entry.slots[i].outcome}" for i in again),
        )
        for i in again:
            entry.slots[i].retire()
            entry.slots[i].resubmits += 1
        self._submit(context, self.generation_requests(), entry, again, ledger)
        return self._wait(context, entry, set())

    def _finish(
        self: GeneratingTask, context: Context, entry: LedgerEntry, ledger: SubmissionLedger | None = None
    ) -> Any:
        ledger = ledger or SubmissionLedger(context)
        ti = context.get("ti")
        entry.finished = True
        entry.delivered_try = ti.try_number if ti is not None else None
        ledger.save(entry)
        requests = self.generation_requests()
        payloads = [r.to_payload(include_callback=False) for r in requests]
        described = InputImages(self, context).described(requests, entry.slots)
        results = [
            _result(slot, payload, input_image)
            for slot, payload, input_image in zip(entry.slots, payloads, described, strict=True)
        ]
        for result in results:
            self.log_outcome(result)
        return self.present(self.deliver(results))


def _submitted_times(slots: Iterable[Slot]) -> dict[str, float]:
    times = {s.remote_task_id: parse_timestamp(s.submitted_at) for s in slots}
    return {remote_id: at.timestamp() for remote_id, at in times.items() if remote_id and at}


def _settle(slot: Slot, record: TaskRecord, via: str) -> None:
    slot.outcome = record.outcome.value if record.outcome else None
    slot.message = record.message
    slot.record = record.to_dict()
    slot.via = via


def _settle_planned_uncertain(slot: Slot) -> None:
    """Settle a slot :func:`plan_slots` found uncertain, keeping the cause an earlier try gave."""
    if slot.remote_task_id is not None:  # stored, but not of the strict form
        refused = InvalidRemoteTaskId("the stored ledger", slot.remote_task_id)
        slot.remote_task_id = None  # never polled, never put in a result: it may name a path
        _settle_uncertain(slot, f"Its stored answer could not be used ({str(refused).rstrip('.')})")
    elif slot.outcome != Outcome.SUBMISSION_UNCERTAIN or not slot.message:
        _settle_uncertain(slot, "Its submission's answer was lost in an earlier try")


def _settle_answered(slot: Slot, error: ImageCbOutcomeAnswer) -> None:
    """Settle a slot whose submission was answered with an outcome code (501, 408): no remote task."""
    slot.outcome, slot.code, slot.sending = error.outcome, error.code, False
    slot.submitted_at = slot.sending_since
    vendor = (error.msg or "").rstrip(". ") or _DEFAULT_ANSWERS.get(error.code, "no message")
    slot.message = (
        f"{vendor} (the API answered {error.code} to the submission: no task was created; not resent "
        "in this try, the next try sends it again)"
    )


_DEFAULT_ANSWERS = {501: "Generation failed", 408: "The upstream gave no result in time"}


def _settle_not_sent(slot: Slot, hold: AccountHold) -> None:
    """Settle a slot the account refused before it was sent: nothing created, the next try sends it."""
    slot.outcome, slot.code, slot.sending = Outcome.NOT_SENT.value, hold.code, False
    slot.message = f"Not sent: {hold.describe()}"


def _settle_uncertain(slot: Slot, cause: str) -> None:
    slot.outcome = Outcome.SUBMISSION_UNCERTAIN.value
    sent = f" (sent at {slot.sending_since})" if slot.sending_since else ""
    slot.message = (
        f"{cause.rstrip('.')}{sent}: the API may have accepted and charged it, so it is not resent "
        "automatically. Check the account for a task of that time, then clear the task to submit again"
    )


def _result(slot: Slot, payload: dict[str, Any], input_image: dict[str, Any] | None = None) -> dict[str, Any]:
    record = TaskRecord.from_dict(slot.record) if slot.record else None
    result = build_result(
        remote_task_id=slot.remote_task_id,
        outcome=Outcome(slot.outcome or Outcome.TIMEOUT),
        record=record,
        request=payload,
        submitted_at=slot.submitted_at,
        polls=slot.polls,
        via=slot.via or "poll",
        input_image=input_image,
    )
    if slot.outcome == Outcome.SUBMISSION_UNCERTAIN:
        result["message"] = slot.message or result["message"]
    elif (record is None and slot.code is not None) or slot.outcome == Outcome.UPLOAD_FAILED:
        # Ended at its submission (501, 408), or before it (upload_failed: the upload API's code,
        # or None for a refused file or the network): no record.
        result["code"], result["message"] = slot.code, slot.message or result["message"]
    result["earlier"] = list(slot.earlier)
    return result


def _fail_on_error(entry: LedgerEntry, ledger: SubmissionLedger, error: dict) -> None:
    """
    Raise the API error that ended the wait, leaving the ledger so the next try can go on.

    A remote task the API no longer knows is retired from its slot: the next try submits that
    request anew instead of meeting the same answer until the stored state expires. The hooks
    report every form of "unknown" (404; 200 with code 422 "The record does not exist"; ``data:
    null``) as :class:`~imagecb_provider.exceptions.ImageCbTaskUnknown`, code 404.
    """
    if error.get("code") == 404 or error.get("error_type") == "ImageCbTaskUnknown":
        for slot in entry.slots:
            if slot.remote_task_id == error.get("remote_task_id"):
                slot.outcome, slot.message = None, "unknown to the API (404)"
                slot.retire()
    ledger.save(entry)
    raise error_from_event(error)


def _callback_urls(
    task: GeneratingTask, context: Context, settings: Any, indexes: list[int]
) -> dict[int, str]:
    """One signed callback URL per request slot in callback mode; none when polling."""
    if task.wait_mode != "callback":
        return {}
    from imagecb_provider.callbacks.tokens import VENDOR_RETRY_WINDOW, callback_url_for_context

    # Checked before the first submission: a missing callback_base_url costs no credit.
    expires_in = check_positive("timeout", task.timeout) + VENDOR_RETRY_WINDOW
    return {i: callback_url_for_context(settings, context, slot=i, expires_in=expires_in) for i in indexes}


class _Window:
    """
    The requests of one task in flight at once, each sent from a thread of its own.

    The threads only pace and talk to the API; every change to the ledger, and every call to
    Airflow (the account hold is a Variable), is handed to the task's own thread through the
    writer, which serves them while it waits.

    :param task: the generate operator.
    :param limiter: the account's limiter (pace, hold).
    :param writer: the ledger's writer.
    :param size: how many requests may wait for their answers at once.
    """

    def __init__(
        self, task: GeneratingTask, limiter: AccountLimiter, writer: LedgerWriter, size: int
    ) -> None:
        self.task, self.limiter, self.writer, self.size = task, limiter, writer, size
        self.active = 0  # threads not finished (changed by the task's thread only)
        self.hold: AccountHold | None = None
        self.error: BaseException | None = None  # what stopped a thread unexpectedly: raised by the task
        self.stopping = False
        self.sent = 0

    def send(self, request: GenerationRequest, slot: Slot) -> None:
        """Pace, then send one request (a thread's job); a hold met meanwhile leaves it ``not_sent``."""
        try:
            self.limiter.pace()
            if self.hold is not None:
                self.writer.commit(lambda: _settle_not_sent(slot, self.hold))
            elif not self.stopping and self.error is None:
                self.task._submit_one(request, slot, self.writer)
                self.writer.commit(self._sent, durable=False)
        except ACCOUNT_REFUSALS as refusal:
            self.writer.commit(lambda refused=refusal: self._refused(refused, slot))
        except BaseException as error:  # bound now: the change runs after this block
            self.writer.commit(lambda failed=error: self._failed(failed), durable=False)
        finally:
            self.writer.commit(self._finished, durable=False)

    # What follows runs in the task's thread, served by the writer.
    def _sent(self) -> None:
        self.sent += 1
        self.limiter.sent()

    def _refused(self, refusal: Exception, slot: Slot) -> None:
        if self.hold is None:
            self.hold = self.limiter.refused(refusal)
        _settle_not_sent(slot, self.hold)

    def _failed(self, error: BaseException) -> None:
        self.error = self.error or error

    def _finished(self) -> None:
        self.active -= 1


# --------------------------------------------------------------------------- input images
#: ``task_state_store`` key of what each request's input image was: ``{"version": 1, "requests":
#: {"<request fingerprint>": {"source", "sha256", "bytes", "uploaded"}}}``, for the results.
INPUTS_STATE_KEY = "imagecb_input_images"
INPUTS_VERSION = 1


class InputImageNotUploaded(Exception):
    """A request's input image was refused or not uploaded; its slot is settled ``upload_failed``."""


class InputImages:
    """
    The input images of one task's requests: uploaded right before their requests are sent, then described.

    An ``http(s)`` link is sent as it is. A file is read and checked
    (:func:`~imagecb_provider.utils.inputs.read_input_image`), then uploaded once per content
    while its link is fresh (:class:`~imagecb_provider.utils.inputs.UploadCache`, kept in
    ``task_state_store`` across retries, resubmissions and cleared reruns), and its request is
    sent with the link. What was read is kept per request fingerprint (:data:`INPUTS_STATE_KEY`;
    on the operator itself where the store is absent), so the results can say it after the wait.

    :param task: the generate operator.
    :param context: the task's context.
    """

    def __init__(self, task: GeneratingTask, context: Context) -> None:
        self.task = task
        self._context = context
        self._store = context.get("task_state_store")
        self._cache: UploadCache | None = None

    def linked(self, request: GenerationRequest, slot: Slot) -> GenerationRequest:
        """
        Return ``request`` as it is sent: an input file replaced by its upload link.

        :param request: the request about to be sent.
        :param slot: its ledger slot (settled ``upload_failed`` when its input cannot be uploaded).
        :raises InputImageNotUploaded: the file was refused or not uploaded; nothing was sent.
        :raises InvalidInputImage: a refused file, when the task has ``raise_invalid_input``.
        """
        source = request.input_image
        if source is None or is_http_url(source):
            return request
        shown = display_name(source)
        try:
            image = read_input_image(source)
        except InvalidInputImage as error:
            self._forget(slot.key)
            if self.task.raise_invalid_input:
                raise
            raise self._fail(slot, f"{error}. Nothing was uploaded or sent", None) from None
        except InputImageUnavailable as error:
            self._forget(slot.key)
            raise self._fail(slot, str(error), None) from None
        described = {"source": shown, "sha256": image.sha256, "bytes": image.size, "uploaded": False}
        if self._cache is None:
            self._cache = UploadCache(self._context)
        try:
            link = self._cache.link_for(image, self.task.hook)
        except ImageCbAuthenticationError:
            raise  # the key was refused: every request would meet it, the task fails at once
        except (ImageCbApiError, ImageCbConnectionError, ImageCbProtocolError) as error:
            self._remember(slot.key, described)
            code = error.code if isinstance(error, ImageCbApiError) else None
            what = without_query(str(error)).rstrip(". ")
            message = f"The input image {shown} could not be uploaded ({what}); nothing was sent"
            raise self._fail(slot, message, code) from None
        self._remember(slot.key, {**described, "uploaded": True})
        self.task.log.info(
            "Input image %s (%d bytes, sha256 %s) goes as its uploaded copy",
            shown,
            image.size,
            image.sha256[:12],
        )
        return request.with_input_link(link)

    def described(
        self, requests: Sequence[GenerationRequest], slots: Sequence[Slot]
    ) -> list[dict[str, Any] | None]:
        """
        The ``input_image`` of each result (see :func:`input_image_result`), in request order.

        :param requests: the task's requests.
        :param slots: their ledger slots, in the same order.
        """
        files = any(r.input_image is not None and not is_http_url(r.input_image) for r in requests)
        known = self._load() if files else {}
        return [
            input_image_result(request.input_image, known.get(slot.key), sent=slot.remote_task_id is not None)
            for request, slot in zip(requests, slots, strict=True)
        ]

    def _fail(self, slot: Slot, message: str, code: int | None) -> InputImageNotUploaded:
        """Settle ``slot`` ``upload_failed`` with ``message``; return the error that stops its submission."""
        _settle_upload_failed(slot, message, code)
        self.task.log.warning("Not sent: %s", message)
        return InputImageNotUploaded(message)

    def _load(self) -> dict[str, dict[str, Any]]:
        local = self.task.__dict__.get("_imagecb_input_images") or {}
        value = self._store.get(INPUTS_STATE_KEY) if self._store is not None else None
        if not isinstance(value, Mapping) or value.get("version") != INPUTS_VERSION:
            return dict(local)
        stored = value.get("requests")
        return {**local, **(dict(stored) if isinstance(stored, Mapping) else {})}

    def _save(self, known: dict[str, dict[str, Any]]) -> None:
        self.task.__dict__["_imagecb_input_images"] = known  # where there is no store, for this process
        if self._store is not None:
            self._store.set(INPUTS_STATE_KEY, {"version": INPUTS_VERSION, "requests": known})

    def _remember(self, key: str, described: dict[str, Any]) -> None:
        known = self._load()
        if known.get(key) != described:
            self._save({**known, key: described})

    def _forget(self, key: str) -> None:
        known = self._load()
        if key in known:
            self._save({k: v for k, v in known.items() if k != key})


def input_image_result(
    source: str | None, known: Mapping[str, Any] | None, *, sent: bool
) -> dict[str, Any] | None:
    """
    A result's ``input_image``: what was read of an input file and whether it was uploaded.

    ``{"source": <the path or URL, no credentials or query>, "sha256": <hex>, "bytes": <size>,
    "uploaded": true}`` when the file went through the upload API (in this try or an earlier
    one); ``"uploaded": false`` when it was read but its upload failed (``upload_failed``).
    ``None`` for an ``http(s)`` link (sent as it is, never read), no input image, or a file that
    was refused before it was read. A request sent by a try whose record is lost (no
    ``task_state_store`` across a deferral) gives ``sha256`` and ``bytes`` as ``None``.

    :param source: the request's ``input_image``.
    :param known: what :class:`InputImages` kept for the request, if anything.
    :param sent: whether the request has a remote task (so its input was uploaded).
    """
    if source is None or is_http_url(source):
        return None
    if isinstance(known, Mapping) and isinstance(known.get("sha256"), str):
        return {
            "source": str(known.get("source") or display_name(source)),
            "sha256": known["sha256"],
            "bytes": known.get("bytes"),
            "uploaded": bool(known.get("uploaded")),
        }
    if sent:
        return {"source": display_name(source), "sha256": None, "bytes": None, "uploaded": True}
    return None


def _settle_upload_failed(slot: Slot, message: str, code: int | None) -> None:
    """Settle a slot whose input image was refused or not uploaded: nothing sent, the next try uploads."""
    slot.outcome, slot.code, slot.sending, slot.message = Outcome.UPLOAD_FAILED.value, code, False, message
