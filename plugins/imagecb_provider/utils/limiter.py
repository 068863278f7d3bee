"""
The account's limits, shared by every task that submits: its rate, and a hold once it refuses.

**Rate.** Every submission waits for the process's :class:`~.pacing.SubmissionPacer`, at the task's
share of the account's limit, and the submitting tasks share one pool (see
:mod:`~imagecb_provider.utils.pacing`).

**Hold.** When the account refuses submissions for longer than a burst, the task that met the
refusal stops submitting and records an *account hold*, so no other task spends its retries on the
same refusal:

* credits ran out (402): the hold lifts as soon as the balance (one credit call) is higher than
  when the hold began, i.e. after a top-up;
* a cap (:class:`~imagecb_provider.exceptions.ImageCbRateCapped`: the key's hourly, daily or total
  cap): one task at most every :data:`PROBE_INTERVAL` seconds sends its requests again as a probe;
  a submission accepted lifts the hold, a new refusal renews it.

While a hold is in force a task sends nothing: its requests end ``not_sent`` with the hold's reason,
at no cost, and a rerun cleared once the account allows it again sends exactly those. The hold is
an Airflow Variable named after the connection (:func:`hold_key`), so it is shared by every worker
and executor and shown under Admin > Variables; deleting it lifts the hold at once. Where Variables
cannot be reached (a hook used outside a task) the hold lives in the process only.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from imagecb_provider.exceptions import (
    ImageCbError,
    ImageCbInsufficientCredits,
    ImageCbRateCapped,
)
from imagecb_provider.models import to_iso
from imagecb_provider.utils.pacing import pacer_for

if TYPE_CHECKING:
    from imagecb_provider.hooks.imagecb import ImageCbHook

log = logging.getLogger(__name__)

#: Seconds between two probes of a capped account, across all tasks.
PROBE_INTERVAL = 60.0
CREDITS = "credits"
RATE_CAP = "rate_cap"
#: The refusals that put the account on hold.
ACCOUNT_REFUSALS = (ImageCbInsufficientCredits, ImageCbRateCapped)


def hold_key(conn_id: str) -> str:
    """The Variable holding ``conn_id``'s account hold."""
    return f"imagecb_account_hold__{conn_id}"


@dataclass(frozen=True)
class AccountHold:
    """Why the account refuses submissions, since when, and when it may be tried again."""

    kind: str
    code: int
    message: str
    since: str
    balance: float | None = None  # credits: the balance when the hold began
    probe_after: float | None = None  # cap: epoch seconds of the next probe

    def describe(self) -> str:
        """What a user reads on each request not sent: the refusal, then what to do."""
        said = f"{self.code} at {self.since}" + (f": {self.message}" if self.message else "")
        if self.kind == CREDITS:
            return (
                f"the account ran out of credits ({said}); top it up, then clear the run: only the "
                "requests never sent are sent"
            )
        return (
            f"the account refused submissions for longer than a burst ({said}), the key's hourly, "
            "daily or total cap; clear the run once it lifts (or raise the cap in the key's settings): "
            "only the requests never sent are sent"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: Any) -> AccountHold | None:
        """Read a stored hold; ``None`` for anything not of its exact form (it is then ignored)."""
        try:
            data = json.loads(text) if isinstance(text, str) else None
            if not isinstance(data, dict) or data.get("kind") not in (CREDITS, RATE_CAP):
                return None
            hold = cls(
                kind=data["kind"],
                code=int(data["code"]),
                message=str(data.get("message") or ""),
                since=str(data["since"]),
                balance=None if data.get("balance") is None else float(data["balance"]),
                probe_after=None if data.get("probe_after") is None else float(data["probe_after"]),
            )
        except (KeyError, TypeError, ValueError, RecursionError):
            return None
        return hold


class HoldStore:
    """
    The account holds, in Airflow Variables; in the process only where Variables cannot be reached.

    :param conn_id: the connection whose account this is.
    """

    _LOCAL: dict[str, str] = {}
    _LOCAL_LOCK = threading.Lock()

    def __init__(self, conn_id: str) -> None:
        self.key = hold_key(conn_id)

    def get(self) -> AccountHold | None:
        value = None
        if _in_task():
            try:
                from airflow.sdk import Variable

                value = Variable.get(self.key, default=None)
            except Exception as error:  # the hold is a courtesy: never fail a submission on it
                log.warning("Could not read the Variable %s: %s", self.key, type(error).__name__)
        else:
            with self._LOCAL_LOCK:
                value = self._LOCAL.get(self.key)
        if value is None:
            return None
        hold = AccountHold.from_json(value)
        if hold is None:
            log.warning("Ignoring the Variable %s: not an imagecb account hold", self.key)
        return hold

    def put(self, hold: AccountHold) -> None:
        if not _in_task():
            with self._LOCAL_LOCK:
                self._LOCAL[self.key] = hold.to_json()
            return
        try:
            from airflow.sdk import Variable

            Variable.set(
                self.key,
                hold.to_json(),
                description="imagecb: the account refuses submissions; delete to lift the hold at once",
            )
        except Exception as error:
            log.warning("Could not write the Variable %s: %s", self.key, type(error).__name__)

    def lift(self) -> None:
        if not _in_task():
            with self._LOCAL_LOCK:
                self._LOCAL.pop(self.key, None)
            return
        try:
            from airflow.sdk import Variable

            Variable.delete(self.key)
        except Exception as error:
            log.warning("Could not delete the Variable %s: %s", self.key, type(error).__name__)


def _in_task() -> bool:
    """Whether this process runs a task (Variables are reached through its supervisor)."""
    from airflow.sdk.execution_time import task_runner

    return getattr(task_runner, "SUPERVISOR_COMMS", None) is not None


class AccountLimiter:
    """
    One task's view of the account's limits: pace each submission, refuse while a hold is in force.

    :param hook: the connection's hook (for the credit balance).
    :param store: where holds live (default: the connection's Variable).
    :param clock: wall-clock seconds, replaceable in tests.
    """

    def __init__(
        self,
        hook: ImageCbHook,
        *,
        store: HoldStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        settings = hook.settings
        self.hook = hook
        self.store = store or HoldStore(settings.conn_id)
        self.pacer = pacer_for(settings.conn_id, settings.share_per_10s)
        self._clock = clock
        self._probing = False

    def admit(self) -> AccountHold | None:
        """Return the hold in force (send nothing), or ``None`` when this task may submit."""
        hold = self.store.get()
        if hold is None:
            return None
        if hold.kind == CREDITS:
            try:
                balance = self.hook.get_credits()
            except ImageCbError:
                return hold  # cannot tell whether it was topped up: keep holding
            if balance > (hold.balance or 0.0):
                log.info("Account hold lifted: %g credits now, %g when it began", balance, hold.balance or 0)
                self.store.lift()
                return None
            return hold
        now = self._clock()
        if hold.probe_after is not None and now < hold.probe_after:
            return hold
        # This task probes; the others keep waiting until the next probe time.
        self.store.put(replace(hold, probe_after=now + PROBE_INTERVAL))
        self._probing = True
        log.info("The account has been capped since %s: probing it with this task's submissions", hold.since)
        return None

    def pace(self) -> None:
        """Wait until the next submission may go out under the account's rate."""
        self.pacer.wait()

    def sent(self) -> None:
        """A submission was accepted: a probe that succeeds lifts the hold."""
        if self._probing:
            self._probing = False
            self.store.lift()
            log.info("Account hold lifted: a submission was accepted")

    def refused(self, error: ImageCbError) -> AccountHold:
        """Record the hold ``error`` (one of :data:`ACCOUNT_REFUSALS`) puts the account on; return it."""
        self._probing = False
        message = str(getattr(error, "msg", "") or "")[:200]
        since = to_iso(datetime.now(UTC))
        code = int(getattr(error, "code", 0) or 0)
        if isinstance(error, ImageCbInsufficientCredits):
            try:
                balance: float | None = self.hook.get_credits()
            except ImageCbError:
                balance = None
            hold = AccountHold(kind=CREDITS, code=code, message=message, since=since, balance=balance)
        else:
            hold = AccountHold(
                kind=RATE_CAP,
                code=code,
                message=message,
                since=since,
                probe_after=self._clock() + PROBE_INTERVAL,
            )
        self.store.put(hold)
        log.warning("The account refuses submissions: %s", hold.describe())
        return hold
