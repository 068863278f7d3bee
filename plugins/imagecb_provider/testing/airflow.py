"""
Helpers for testing DAGs and operators that use the provider, without a running Airflow.

* :func:`run_dag_test`: ``dag.test()`` for a DAG defined in a test, registered first the way the
  scheduler would (bundles synced, DAG serialized), so its tasks find their DAG;
* :class:`InMemoryTaskStateStore`: the methods of Airflow's ``task_state_store`` accessor, kept in
  a dict, for calling an operator's ``execute`` directly with the state an earlier try left.
"""

from __future__ import annotations

from typing import Any


def run_dag_test(dag: Any, **kwargs: Any) -> Any:
    """
    Register ``dag`` as the scheduler would, then run it with ``dag.test()``; return the DagRun.

    :param dag: a DAG defined in the test.
    :param kwargs: ``dag.test()`` arguments (``logical_date``, ``run_conf``, ...).
    """
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(dag_folder=None, collect_dags=False)
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)
    return dag.test(**kwargs)


class InMemoryTaskStateStore(dict):
    """Keep ``task_state_store`` values in memory; every value set is also kept in ``writes``."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.writes: list[Any] = []

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key, default)

    def set(self, key: str, value: Any, retention: Any = None) -> None:
        self.writes.append(value)
        self[key] = value

    def delete(self, key: str) -> None:
        self.pop(key, None)
