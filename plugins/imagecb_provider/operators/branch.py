"""
Route an image result by its outcome: ``ImageOutcomeBranchOperator``.

Why it is not a plain ``BaseBranchOperator``
--------------------------------------------
Branching per map index is broken in Airflow 3.3.2 (upstream apache/airflow#67265). Inside a
mapped task group (``@task_group`` + ``.expand()``) a branch operator logs "Skipping tasks" for
the branches it did not choose, and those branches run anyway:

* ``SkipMixin._set_state_to_skipped`` (``airflow/sdk/bases/skipmixin.py``) only raises
  ``DownstreamTasksSkipped`` when ``map_index == -1``; for a mapped task instance it does nothing
  and leaves the work to the scheduler's ``NotPreviouslySkippedDep``.
* ``NotPreviouslySkippedDep`` reads the branch's ``skipmixin_key`` XCom at ``map_index=-1``
  unless the branch *itself* is a mapped operator; a task inside a mapped task group is not one
  (its serialized ``is_mapped`` is ``False``), so it finds nothing and lets every branch run.

Raising ``DownstreamTasksSkipped(tasks=[(task_id, map_index), ...])`` ourselves does not fix it
either: the execution API skips exactly the task instances that exist when the branch finishes,
but the tasks of a mapped group are expanded lazily, often *after* the branch ran (measured
with ``dag.test()``: of the 8 unchosen task instances of a 4-index group, 5 existed and were
skipped, 3 were created later and ran). Which ones exist is a matter of scheduling timing.

What does work per map index is a task skipping *itself* (``AirflowSkipException``). So:

1. The branch records its decision as an XCom (key ``imagecb_branch``, per map index:
   ``{"outcome", "chosen", "followed", "skipped"}``), and also the standard ``skipmixin_key`` XCom.
2. When a task is set directly downstream of the branch (``>>``, ``<<``, ``set_downstream``,
   ``set_upstream``, ``chain``, task groups, ``Label``), the branch installs an *outcome guard*
   as that task's ``pre_execute`` hook (chained before any hook the task already had). The guard
   reads the decision of the branch **for its own map index** and raises
   ``AirflowSkipException`` when the task was not chosen. It runs on every try, so a task cleared
   from the UI re-reads the current decision; clearing a map index of the branch re-decides
   that index only (its XCom is replaced on rerun).
3. As a fast path, the branch still raises ``DownstreamTasksSkipped`` for the unchosen task
   instances of its own map index, so those that already exist are skipped without taking a
   worker slot; the guard covers the rest. For a non-mapped branch this is the standard
   Airflow mechanism and is sufficient on its own.

The guard lives in the parsed DAG, so it is installed the same way in the worker that parses
the DAG file as in ``dag.test()``. Before deciding, a branch running at a map index checks that
each of its direct downstream tasks carries its guard and fails (no retry) if one does not,
rather than let an unchosen branch run silently.

What the DAG author must (and must not) do
------------------------------------------
* Put the branch and its branches in the same mapped task group and set the dependencies with
  the usual operators (``route >> [archive, quarantine, resubmit]``). Nothing else is needed: no
  decorator, no trigger rule on the branch targets.
* Tasks *after* the branches that should run whichever branch was taken need a trigger rule that
  tolerates skipped upstreams: inside the mapped group ``none_failed`` (per map index); after the
  group ``none_failed_min_one_success`` or ``all_done``. Not ``none_failed_min_one_success``
  inside the group: Airflow 3.3.2 makes such a task wait on every map index, so one failed index
  marks it upstream_failed for all (apache/airflow#69377). A skipped branch task skips its own
  ``all_success`` downstream per map index.
* Do not map the branch operator itself with ``.partial().expand()``: there is no per-index
  downstream to route then; map a task group instead (the branch fails loudly if you do).
* Do not add dependencies by editing ``upstream_task_ids``/``downstream_task_ids`` directly (the
  guard would not be installed; the branch detects it and fails).
* A direct downstream task that is itself ``.expand()``-ed carries no guard; Airflow allows that
  only outside a mapped task group, i.e. below a non-mapped branch, where Airflow's own skipping
  covers it.

Semantics
---------
* ``result``: the generate operator's result dict (its ``"outcome"`` key is read), an outcome
  name as a string, or ``None``. ``None`` (no result, e.g. the upstream was skipped and this
  branch runs because of its trigger rule) **skips every direct downstream task**: there is no
  image to archive, quarantine or resubmit.
* ``branches`` maps outcome names (``success``, ``content_policy``, ``internal_error``,
  ``generation_failed``, ``timeout``) to a task id, a task group id, or a list of them. An empty
  list means "skip all" for that outcome.
* ``default`` is used for an outcome missing from ``branches``; ``[]`` means skip all. When it is
  ``None`` (the default) an unmapped outcome fails the branch task (no retry): a forgotten route
  should be visible, not silently dropped.
* Ids may be given relative to the branch's own task group (``"archive"``) or in full
  (``"image.archive"``); relative ids are tried first. A task group id stands for its root tasks.
  As with any Airflow branch, a direct downstream task that is also downstream of a chosen task
  (a "join") is followed, not skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseBranchOperator, BaseOperator
from airflow.sdk.bases.skipmixin import XCOM_SKIPMIXIN_FOLLOWED, XCOM_SKIPMIXIN_KEY
from airflow.sdk.definitions.mappedoperator import MappedOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException, DownstreamTasksSkipped

from imagecb_provider.models import Outcome

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = ["DECISION_XCOM_KEY", "OUTCOMES", "ImageOutcomeBranchOperator"]

#: The outcome names a ``branches`` mapping may use.
OUTCOMES: tuple[str, ...] = tuple(outcome.value for outcome in Outcome)

#: XCom key under which the branch records its decision for its map index.
DECISION_XCOM_KEY = "imagecb_branch"

Targets = str | Sequence[str]


def _normalize_targets(value: Any, what: str) -> list[str]:
    """A target spec (a task id or a list of them) as a list of ids; raise on anything else."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{what}: a task id must not be empty")
        return [value]
    if isinstance(value, Sequence):
        ids = list(value)
        bad = [item for item in ids if not isinstance(item, str) or not item]
        if bad:
            raise TypeError(f"{what}: expected task ids (non-empty strings), got {bad!r}")
        return ids
    raise TypeError(
        f"{what}: expected a task id or a list of task ids, got {type(value).__name__} ({value!r})"
    )


class _OutcomeGuard:
    """
    ``pre_execute`` hook installed on the direct downstream tasks of a branch.

    Skips the task when the branch's decision for the task's own map index does not follow it;
    then calls the hook the task had before (``then``), if any.
    """

    def __init__(self, branch_task_id: str, then: Any = None) -> None:
        self.branch_task_id = branch_task_id
        self.then = then

    def guards(self, branch_task_id: str) -> bool:
        hook: Any = self
        while isinstance(hook, _OutcomeGuard):
            if hook.branch_task_id == branch_task_id:
                return True
            hook = hook.then
        return False

    def __call__(self, context: Context) -> None:
        ti = context["ti"]
        task = ti.task
        map_index = None
        if task.dag.has_task(self.branch_task_id):
            map_index = _decision_map_index(task.dag.get_task(self.branch_task_id), task, ti.map_index)
        if map_index is not None:
            decision = ti.xcom_pull(
                task_ids=self.branch_task_id, key=DECISION_XCOM_KEY, map_indexes=map_index, default=None
            )
            if not isinstance(decision, Mapping):
                # The branch did not decide (it failed, or a trigger rule let this task run anyway):
                # nothing routed here, so nothing to act on.
                raise AirflowSkipException(
                    f"No routing decision from {self.branch_task_id} for map index {map_index} "
                    "(it failed or did not run): skipped"
                )
            if task.task_id in (decision.get("skipped") or ()):
                raise AirflowSkipException(
                    f"Not chosen by {self.branch_task_id}: outcome {decision.get('outcome')!r} "
                    f"routes to {decision.get('chosen')}"
                )
        if self.then is not None:
            self.then(context)

    def __repr__(self) -> str:
        return f"_OutcomeGuard({self.branch_task_id!r}, then={self.then!r})"


def _mapped_scope(task: Any) -> str | None:
    """The id of the mapped task group ``task`` is in, ``""`` for a mapped operator, else None."""
    if isinstance(task, MappedOperator):
        return ""
    group = task.get_closest_mapped_task_group()
    return group.group_id if group is not None else None


def _decision_map_index(branch: Any, task: Any, map_index: int) -> int | None:
    """
    The map index of the branch decision that applies to ``task`` running at ``map_index``.

    ``-1`` for a non-mapped branch; the task's own index when the task shares the branch's mapped
    task group; ``None`` (not routed) when indexes do not correspond, e.g. a task after the group.
    """
    scope = _mapped_scope(branch)
    if scope is None:
        return -1
    if map_index >= 0 and scope and _mapped_scope(task) == scope:
        return map_index
    return None


def _install_guard(task: Any, branch_task_id: str) -> None:
    if not isinstance(task, BaseOperator):
        return  # a MappedOperator: see the module docstring
    hook = task._pre_execute_hook
    if isinstance(hook, _OutcomeGuard) and hook.guards(branch_task_id):
        return
    task._pre_execute_hook = _OutcomeGuard(branch_task_id, then=hook)


def _has_guard(task: Any, branch_task_id: str) -> bool:
    hook = getattr(task, "_pre_execute_hook", None)
    return isinstance(hook, _OutcomeGuard) and hook.guards(branch_task_id)


class ImageOutcomeBranchOperator(BaseBranchOperator):
    """
    Follow the branch mapped to the outcome of an image result, skip the other direct downstream
    tasks; works per map index inside a mapped task group (see the module docstring for why and
    how).

    :param result: the result dict of ``ImageGenerateOperator`` / ``ImageTaskSensor`` (usually
        ``generate.output``), an outcome name, or ``None`` (skip all direct downstream tasks).
        Templated.
    :param branches: outcome name -> task id, task group id, or list of them (``[]``: skip all).
        Ids may be relative to this operator's task group.
    :param default: where an outcome missing from ``branches`` goes; ``[]`` skips all; ``None``
        (default) fails the task for such an outcome.
    """

    template_fields: Sequence[str] = ("result",)
    ui_color = "#f4e3ff"
    #: Also skip the unchosen task instances that already exist when the branch finishes (saves
    #: their worker slot). The outcome guards alone are sufficient; tests turn this off to prove it.
    _skip_known_downstream: bool = True

    def __init__(
        self,
        *,
        result: Any,
        branches: Mapping[str, Targets],
        default: Targets | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(branches, Mapping):
            raise TypeError(
                f"{self.task_id}: branches must be a dict of outcome -> task id(s), "
                f"got {type(branches).__name__}"
            )
        allowed = ", ".join(OUTCOMES)
        for key in branches:
            if key not in OUTCOMES:
                raise ValueError(
                    f"{self.task_id}: unknown outcome {key!r} in branches; allowed outcomes: {allowed}"
                )
        self.result = result
        self.branches: dict[str, list[str]] = {
            key: _normalize_targets(value, f"{self.task_id}: branches[{key!r}]")
            for key, value in branches.items()
        }
        self.default: list[str] | None = (
            None if default is None else _normalize_targets(default, f"{self.task_id}: default")
        )

    # -- guard installation: every way of making a task directly downstream of this one ends in
    # -- one of these two methods (DAGNode._set_relatives calls other.update_relative(self, ...)).
    def _set_relatives(self, task_or_task_list, upstream=False, edge_modifier=None) -> None:
        super()._set_relatives(task_or_task_list, upstream=upstream, edge_modifier=edge_modifier)
        if not upstream:
            for task in self.downstream_list:
                _install_guard(task, self.task_id)

    # Airflow always passes every argument, and the base method is a no-op kept for its contract:
    # mutating either line changes nothing (see dev/mutation.md).
    def update_relative(self, other, upstream=True, edge_modifier=None) -> None:  # pragma: no mutate
        super().update_relative(other, upstream=upstream, edge_modifier=edge_modifier)  # pragma: no mutate
        if not upstream:
            _install_guard(other, self.task_id)

    # -- deciding
    def outcome_of(self, result: Any) -> str | None:
        """The outcome name in ``result``; ``None`` when there is no result."""
        if result is None:
            return None
        if isinstance(result, Mapping):
            outcome = result.get("outcome")
            if outcome is None:
                raise AirflowFailException(
                    f"The result has no 'outcome' (keys: {sorted(result)}); is it an image result "
                    "from ImageGenerateOperator or ImageTaskSensor?"
                )
        elif isinstance(result, str):
            outcome = result
        else:
            raise AirflowFailException(
                f"result must be an image result dict, an outcome name or None, got {type(result).__name__}"
            )
        outcome = str(outcome)
        if outcome not in OUTCOMES:
            raise AirflowFailException(
                f"Unknown outcome {outcome!r} in the result; known outcomes: {', '.join(OUTCOMES)}"
            )
        return outcome

    def targets_for(self, outcome: str | None) -> list[str]:
        """The target names (as given) for ``outcome``; ``[]`` for no result."""
        if outcome is None:
            return []
        if outcome in self.branches:
            return list(self.branches[outcome])
        if self.default is not None:
            return list(self.default)
        raise AirflowFailException(
            f"No branch for outcome {outcome!r} and no default: add it to branches "
            f"(routed: {sorted(self.branches)}) or set default (default=[] skips all)"
        )

    def resolve(self, name: str) -> list[str]:
        """Full task ids for a task or task group id given relative to this task's group or in full."""
        dag = self.dag
        candidates = list(dict.fromkeys([self.task_group.child_id(name) if self.task_group else name, name]))
        for candidate in candidates:
            if candidate in dag.task_dict:
                return [candidate]
        for candidate in candidates:
            group = dag.task_group_dict.get(candidate)
            if group is not None:
                return [root.task_id for root in group.roots]
        raise AirflowFailException(
            f"Branch target {name!r} is neither a task nor a task group of DAG {dag.dag_id!r} "
            f"(tried {candidates}); direct downstream tasks of {self.task_id}: "
            f"{sorted(self.downstream_task_ids)}"
        )

    def choose_branch(self, context: Context) -> list[str]:
        """Full ids of the tasks to follow for the rendered ``result``."""
        chosen: list[str] = []
        for name in self.targets_for(self.outcome_of(self.result)):
            chosen.extend(task_id for task_id in self.resolve(name) if task_id not in chosen)
        return chosen

    def decide(self, context: Context) -> dict[str, Any]:
        """This task instance's decision: outcome, chosen ids, followed and skipped direct downstream."""
        outcome = self.outcome_of(self.result)
        chosen = self.choose_branch(context)
        dag = self.dag
        reached = set(chosen)
        for task_id in chosen:
            reached.update(dag.get_task(task_id).get_flat_relative_ids(upstream=False))
        direct = sorted(self.downstream_task_ids)
        return {
            "outcome": outcome,
            "chosen": chosen,
            "followed": [task_id for task_id in direct if task_id in reached],
            "skipped": [task_id for task_id in direct if task_id not in reached],
        }

    def _check_guards(self, map_index: int) -> None:
        if map_index < 0:
            return  # a non-mapped branch: Airflow's own skipping works
        if self.get_closest_mapped_task_group() is None:
            raise AirflowFailException(
                f"{self.task_id} is mapped with .partial().expand(); per-index routing needs a mapped "
                "task group instead: put the branch and its branches in a @task_group and .expand() it"
            )
        unguarded = sorted(t.task_id for t in self.downstream_list if not _has_guard(t, self.task_id))
        if unguarded:
            raise AirflowFailException(
                f"Cannot route per map index: direct downstream task(s) {unguarded} of {self.task_id} "
                "carry no outcome guard: was the dependency set without >>, <<, set_downstream or "
                "set_upstream?"
            )

    def execute(self, context: Context) -> None:
        ti = context["ti"]
        self._check_guards(ti.map_index)
        decision = self.decide(context)
        if decision["outcome"] is None:
            self.log.warning("No result (upstream skipped?): skipping all direct downstream tasks")
        self.log.info(
            "Outcome %r -> chosen %s; following %s, skipping %s (map index %s)",
            decision["outcome"],
            decision["chosen"],
            decision["followed"],
            decision["skipped"],
            ti.map_index,
        )
        ti.xcom_push(key=DECISION_XCOM_KEY, value=decision)
        ti.xcom_push(key=XCOM_SKIPMIXIN_KEY, value={XCOM_SKIPMIXIN_FOLLOWED: decision["followed"]})
        if decision["skipped"] and (self._skip_known_downstream or ti.map_index < 0):
            raise DownstreamTasksSkipped(tasks=[(task_id, ti.map_index) for task_id in decision["skipped"]])
