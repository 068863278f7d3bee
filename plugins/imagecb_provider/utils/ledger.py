"""
The submission ledger: what a task instance has sent to the API, kept in ``task_state_store``.

One entry per task instance (key :data:`STATE_KEY`), keyed by Airflow on (run, task, map index),
so a value written in try 1 is read in try 2 and by a rerun cleared from the UI. It holds one
*slot* per request, in request order::

    {"version": 2, "finished": false, "delivered_try": null, "slots": [
        {"key": "<request fingerprint>", "remote_task_id": "abc" | null, "sending": false,
         "submitted_at": "<ISO 8601>", "outcome": null | "success" | ..., "message": "",
         "polls": 0, "resubmits": 0, "record": {...} | null, "via": "poll" | "callback" | null,
         "code": null | 501,
         "earlier": [{"remote_task_id": "...", "outcome": "internal_error", "message": "..."}]}]}

``sending`` is written before a submission goes out and cleared when its answer (the remote task
id) is stored: a slot still ``sending`` on the next try had its answer lost, so it may have been
charged and is never resent automatically. A request whose submission was answered with an
outcome code (501 "Generation Failed", or 408) ended without a remote task: its slot holds the
outcome, the ``code`` and the message, no ``remote_task_id``, and is sent again by the next try
(nothing was created, so nothing can be paid twice). ``finished`` says the outcomes were delivered
(the task returned or raised them); :func:`plan_slots` turns all of it into what each slot does next.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from imagecb_provider.exceptions import InvalidRemoteTaskId
from imagecb_provider.models import Outcome, remote_task_id

if TYPE_CHECKING:
    from airflow.sdk import Context

#: ``task_state_store`` key; renaming it would orphan the remote tasks of in-flight retries.
STATE_KEY = "imagecb_submission"
LEDGER_VERSION = 2


@dataclass
class Slot:
    """One request of the task and the remote task that currently stands for it."""

    key: str
    remote_task_id: str | None = None
    sending: bool = False
    sending_since: str | None = None  # when the request in flight (or lost) was sent
    submitted_at: str | None = None
    outcome: str | None = None
    message: str = ""
    polls: int = 0
    resubmits: int = 0
    record: dict[str, Any] | None = None  # the ended task's record (TaskRecord.to_dict())
    via: str | None = None  # how the ending was learned: poll or callback
    #: The vendor's code when the request ended without a remote task (501 or 408 to its submission).
    code: int | None = None
    earlier: list[dict[str, Any]] = field(default_factory=list)

    def retire(self) -> None:
        """Move the current remote task to ``earlier``: the slot is about to be submitted anew."""
        if self.remote_task_id:
            self.earlier.append(
                {"remote_task_id": self.remote_task_id, "outcome": self.outcome, "message": self.message}
            )
        self.remote_task_id, self.sending, self.sending_since, self.submitted_at = None, False, None, None
        self.outcome, self.message, self.polls, self.record, self.via = None, "", 0, None, None
        self.code = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Slot:
        """
        Build a slot from its stored form, ignoring unknown keys.

        :param data: one element of a ledger value's ``slots``; copied, so a change to the slot
            (:meth:`retire` appends to ``earlier``) reaches the store only through a save.
        """
        known = {name: copy.deepcopy(data[name]) for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


@dataclass
class LedgerEntry:
    """Every slot of a task instance, and whether their outcomes were delivered."""

    slots: list[Slot]
    finished: bool = False
    delivered_try: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": LEDGER_VERSION,
            "finished": self.finished,
            "delivered_try": self.delivered_try,
            "slots": [asdict(slot) for slot in self.slots],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerEntry:
        slots = [Slot.from_dict(s) for s in data.get("slots") or () if isinstance(s, Mapping)]
        return cls(slots=slots, finished=bool(data.get("finished")), delivered_try=data.get("delivered_try"))


class SubmissionLedger:
    """
    The task instance's :class:`LedgerEntry`, read from and written to ``task_state_store``.

    Where the store is absent (Airflow before 3.3, or a bare context) the ledger keeps nothing and
    :attr:`available` is false, so the caller can warn that a retry will submit anew.
    """

    def __init__(self, context: Context | Mapping[str, Any]) -> None:
        self._store = context.get("task_state_store")

    @property
    def available(self) -> bool:
        return self._store is not None

    def load(self) -> LedgerEntry | None:
        value = self._store.get(STATE_KEY) if self._store is not None else None
        if not isinstance(value, Mapping) or value.get("version") != LEDGER_VERSION:
            return None
        return LedgerEntry.from_dict(value)

    def save(self, entry: LedgerEntry) -> None:
        if self._store is not None:
            self._store.set(STATE_KEY, entry.to_dict())


class LedgerWriter:
    """
    Change one entry from several threads and store the changes in as few writes as keep the rule.

    Only the thread that creates the writer (the task's own) changes the entry and talks to
    Airflow: Airflow's in-process supervisor of ``dag.test()`` is not safe to call from two threads
    (``InProcessSupervisorComms``). Another thread hands it a change with :meth:`commit` and, when
    durable, gets control back only once a write holding that change is stored: a ``sending``
    mark is stored before its request leaves. The owner applies every change waiting in one go
    and writes once (a group commit, :meth:`serve`), so k requests in flight cost about two writes
    per round, not 2k, and no slot is ever stored half-changed.

    :param ledger: where the entry is stored.
    :param entry: the entry every change is made to.
    """

    def __init__(self, ledger: SubmissionLedger, entry: LedgerEntry) -> None:
        self.ledger = ledger
        self.entry = entry
        self.writes = 0
        self._owner = threading.get_ident()
        self._waiting: queue.SimpleQueue[_Change] = queue.SimpleQueue()

    def commit(self, change: Callable[[], Any] | None = None, *, durable: bool = True) -> None:
        """
        Have ``change`` applied to the entry (by the owner); with ``durable``, return once it is stored.

        :param change: a function changing the entry (or doing the owner's Airflow calls).
        :param durable: wait for the write; ``False``: the next write stores it.
        :raises Exception: the write that was to store the change failed.
        """
        if threading.get_ident() == self._owner:
            if change is not None:
                change()
            if durable:
                self._write()
            return
        waiting = _Change(change, durable)
        self._waiting.put(waiting)
        if durable:
            waiting.done.wait()
            if waiting.error is not None:
                raise waiting.error

    def serve(self, timeout: float | None = None) -> bool:
        """
        Apply every change the other threads handed over, write once if one asks for it (owner only).

        :param timeout: seconds to wait for the first change (``None``: until one comes).
        :return: whether any change came.
        """
        try:
            batch = [self._waiting.get(timeout=timeout)]
        except queue.Empty:
            return False
        while True:
            try:
                batch.append(self._waiting.get_nowait())
            except queue.Empty:
                break
        error: BaseException | None = None
        for waiting in batch:
            if waiting.change is not None:
                try:
                    waiting.change()
                except BaseException as failed:  # handed to the thread that sent the change
                    waiting.error = failed
        if any(w.durable and w.error is None for w in batch):
            try:
                self._write()
            except BaseException as failed:
                error = failed
        unreported = next((w.error for w in batch if w.error is not None and not w.durable), None)
        for waiting in batch:
            waiting.error = waiting.error or error
            waiting.done.set()
        if error is not None or unreported is not None:
            raise error or unreported  # nobody waits for a change not made durable: the owner raises
        return True

    def _write(self) -> None:
        self.ledger.save(self.entry)
        self.writes += 1


class _Change:
    """A change handed to the writer's owner, and what became of it."""

    def __init__(self, change: Callable[[], Any] | None, durable: bool) -> None:
        self.change, self.durable = change, durable
        self.done = threading.Event()
        self.error: BaseException | None = None


class Action(StrEnum):
    """What a slot does on this try."""

    SUBMIT = "submit"  # send the request (again)
    RECONNECT = "reconnect"  # wait for (or take the ended outcome of) the stored remote task
    UNCERTAIN = "uncertain"  # its answer was lost: may be charged, never resent automatically


def plan_slots(
    entry: LedgerEntry | None, keys: Sequence[str], *, reuse_successes: bool, new_run: bool
) -> tuple[list[Slot], list[Action]]:
    """
    Decide per request whether this try submits, reconnects, or reports an uncertain submission.

    The rule: a retry settles what the earlier try left unsettled. While the outcomes were never
    delivered (no ``finished`` mark), every stored remote task is reconnected to, whatever it
    ended with, and nothing is sent twice. Once they were delivered, a failed request is sent
    anew; a success is reused when ``reuse_successes`` (a batch rerun regenerates only what did
    not succeed) and a timeout is always reconnected to (the image may still come). A
    content-policy rejection is sent anew only on a ``new_run`` (a rerun cleared from the UI):
    an automatic retry would be flagged and charged again, and so is an uncertain submission (it
    may be charged already: a person checks the account, then clears the task). A stored remote
    task id not of the strict form is never polled: its slot is uncertain.

    :param entry: the stored ledger, if any.
    :param keys: the request fingerprints of this try, in order; a slot whose stored key differs
        (the request changed) starts afresh.
    :param reuse_successes: keep the images of requests that succeeded.
    :param new_run: this try is the first of a run or of a rerun cleared from the UI.
    :return: the slots (stored ones where they still apply) and one action per request.
    """
    stored = entry.slots if entry is not None else []
    delivered = bool(entry and entry.finished)
    slots: list[Slot] = []
    actions: list[Action] = []
    for index, key in enumerate(keys):
        slot = stored[index] if index < len(stored) and stored[index].key == key else Slot(key=key)
        slots.append(slot)
        actions.append(_action(slot, delivered=delivered, reuse=reuse_successes, new_run=new_run))
    return slots, actions


def _action(slot: Slot, *, delivered: bool, reuse: bool, new_run: bool) -> Action:
    if slot.remote_task_id is not None and not _is_remote_task_id(slot.remote_task_id):
        return Action.UNCERTAIN  # a stored answer that was not a task id: sent, maybe charged
    if not delivered:
        if slot.remote_task_id:
            return Action.RECONNECT
        return Action.UNCERTAIN if slot.sending else Action.SUBMIT
    if not slot.remote_task_id:
        # A batch that raised a retryable outcome is retried with its uncertain slots in it.
        uncertain = slot.outcome == Outcome.SUBMISSION_UNCERTAIN and not new_run
        return Action.UNCERTAIN if uncertain else Action.SUBMIT
    keep = {
        Outcome.SUCCESS: reuse,
        Outcome.TIMEOUT: True,
        Outcome.CONTENT_POLICY: not new_run,
    }
    return Action.RECONNECT if keep.get(slot.outcome, False) else Action.SUBMIT


def _is_remote_task_id(value: object) -> bool:
    try:
        remote_task_id(value, "the stored ledger")
    except InvalidRemoteTaskId:
        return False
    return True


def remote_ids_of_slot(entry: Mapping[str, Any] | None, slot: int) -> frozenset[str] | None:
    """
    The remote task ids a stored ledger value has bound to request ``slot`` (every attempt).

    ``None`` when the slot is not bound yet (it does not exist, or a submission for it is in
    flight and its answer, the new id, is not stored): a callback for it may legitimately arrive
    before the ledger is written.
    """
    slots = entry.get("slots") if isinstance(entry, Mapping) else None
    if not isinstance(slots, list) or not 0 <= slot < len(slots) or not isinstance(slots[slot], Mapping):
        return None
    record = slots[slot]
    if record.get("sending"):
        return None
    ids = {record.get("remote_task_id")} | {e.get("remote_task_id") for e in record.get("earlier") or ()}
    bound = frozenset(i for i in ids if isinstance(i, str) and i)
    return bound or None
