"""
Helpers for testing DAGs and operators that use the provider, without a running Airflow.

* :func:`run_dag_test`: ``dag.test()`` for a DAG defined in a test, registered first the way the
  scheduler would (bundles synced, DAG serialized), so its tasks find their DAG;
* :class:`InMemoryTaskStateStore`: the methods of Airflow's ``task_state_store`` accessor, kept in
  memory as JSON, for calling an operator's ``execute`` directly with the state an earlier try left.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, MutableMapping
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


class InMemoryTaskStateStore(MutableMapping[str, Any]):
    """
    Keep ``task_state_store`` values in memory as JSON, as the real store's database does.

    Every value is encoded on the way in and decoded on the way out, so a caller never holds a
    reference to what is stored: a change made without :meth:`set` is lost, as it would be in
    Airflow, and a value JSON cannot carry fails on :meth:`set`. Item access (``store[key]``)
    takes the same road, for a test to set up or inspect the stored state; only :meth:`set` calls
    are recorded in :attr:`writes`, as decoded copies, in order.

    :param args: initial contents, as for ``dict``.
    """

    def __init__(self, *args: Any) -> None:
        self._encoded: dict[str, str] = {}
        self.writes: list[Any] = []
        self.update(*args)

    def __getitem__(self, key: str) -> Any:
        return json.loads(self._encoded[key])

    def __setitem__(self, key: str, value: Any) -> None:
        self._encoded[key] = json.dumps(value)

    def __delitem__(self, key: str) -> None:
        del self._encoded[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._encoded)

    def __len__(self) -> int:
        return len(self._encoded)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self)!r})"

    def get(self, key: str, default: Any = None) -> Any:
        """
        Return a fresh copy of the stored value, or ``default`` when ``key`` is not stored.

        :param key: the key.
        :param default: what to return for a key not stored.
        """
        return self[key] if key in self._encoded else default

    def set(self, key: str, value: Any, *, retention: Any = None) -> None:
        """
        Store ``value`` as JSON and record it in :attr:`writes`.

        :param key: the key.
        :param value: any JSON value but ``None``; anything else raises, as in Airflow.
        :param retention: accepted for the real signature; nothing expires here.
        """
        if value is None:
            raise ValueError("Cannot set value as None")
        self[key] = value  # raises TypeError for a value JSON cannot carry, before anything is kept
        self.writes.append(self[key])

    def delete(self, key: str) -> None:
        """
        Delete ``key``; a key not stored is no error.

        :param key: the key.
        """
        self._encoded.pop(key, None)
