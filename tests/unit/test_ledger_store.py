"""
A change to the ledger reaches ``task_state_store`` only through a save, as in Airflow.

Airflow's store keeps JSON in its database: a value read is a fresh copy and a value set is
copied at once. The in-memory stand-in must behave the same, or a missing ``save()`` is invisible
to every test that uses it.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from imagecb_provider.testing.airflow import InMemoryTaskStateStore
from imagecb_provider.utils.ledger import STATE_KEY, LedgerEntry, LedgerWriter, Slot, SubmissionLedger


def test_a_value_read_is_a_copy():
    store = InMemoryTaskStateStore()
    store.set("k", {"ids": ["r1"]})
    store.get("k")["ids"].append("r2")
    store["k"]["ids"].append("r3")
    assert store.get("k") == {"ids": ["r1"]}


def test_a_value_set_is_copied_at_once_and_so_is_its_write_record():
    store = InMemoryTaskStateStore()
    value = {"ids": ["r1"], "pair": ("a", 1)}
    store.set("k", value)
    value["ids"].append("r2")
    assert store.get("k") == {"ids": ["r1"], "pair": ["a", 1]}  # a tuple comes back a list, as JSON
    assert store.writes == [{"ids": ["r1"], "pair": ["a", 1]}]
    store.writes[0]["ids"].append("r3")
    assert store.get("k") == {"ids": ["r1"], "pair": ["a", 1]}


def test_initial_contents_are_copied_too():
    value = {"ids": ["r1"]}
    store = InMemoryTaskStateStore({"k": value})
    value["ids"].append("r2")
    assert store.get("k") == {"ids": ["r1"]}
    assert store.writes == []  # only what the code under test sets is a write


@pytest.mark.parametrize(
    ("value", "error"), [({"at": object()}, TypeError), ({1, 2}, TypeError), (None, ValueError)]
)
def test_a_value_the_real_store_refuses_is_refused_and_not_kept(value, error):
    store = InMemoryTaskStateStore({"k": "before"})
    with pytest.raises(error):
        store.set("k", value)
    assert (store.get("k"), store.writes) == ("before", [])


def test_get_delete_and_clear_follow_the_accessor():
    store = InMemoryTaskStateStore({"a": 1, "b": [2]})
    assert store.get("missing") is None
    assert store.get("missing", "dflt") == "dflt"
    store.delete("a")
    store.delete("a")  # a key not stored is no error
    assert dict(store) == {"b": [2]}
    store.clear()
    assert len(store) == 0


def test_a_slot_changed_after_a_load_is_stored_only_by_a_save():
    """The case the review found: ``retire()`` appends to ``earlier``, which must not be the store's."""
    store = InMemoryTaskStateStore()
    ledger = SubmissionLedger({"task_state_store": store})
    ledger.save(LedgerEntry(slots=[Slot(key="k", remote_task_id="r2", earlier=[{"remote_task_id": "r1"}])]))
    entry = ledger.load()
    entry.slots[0].retire()
    stored = ledger.load().slots[0]
    assert (stored.remote_task_id, stored.earlier) == ("r2", [{"remote_task_id": "r1"}])
    ledger.save(entry)
    stored = ledger.load().slots[0]
    assert stored.remote_task_id is None
    assert [e["remote_task_id"] for e in stored.earlier] == ["r1", "r2"]
    assert len(store.writes) == 2


def test_a_slot_read_from_a_mapping_shares_nothing_with_it():
    data = {
        "key": "k",
        "remote_task_id": "r2",
        "record": {"task_id": "r2"},
        "earlier": [{"remote_task_id": "r1"}],
    }
    slot = Slot.from_dict(data)
    slot.record["task_id"] = "changed"
    slot.earlier[0]["remote_task_id"] = "changed"
    slot.retire()
    assert data == {
        "key": "k",
        "remote_task_id": "r2",
        "record": {"task_id": "r2"},
        "earlier": [{"remote_task_id": "r1"}],
    }


def test_an_entry_read_from_a_stored_value_leaves_the_value_alone():
    value = LedgerEntry(slots=[Slot(key="k", remote_task_id="r1")]).to_dict()
    store = InMemoryTaskStateStore({STATE_KEY: value})
    entry = LedgerEntry.from_dict(value)
    entry.slots[0].retire()
    assert value["slots"][0]["earlier"] == []
    assert store[STATE_KEY] == value


# --------------------------------------------------------------------------- grouped writes
class SlowStore(InMemoryTaskStateStore):
    """A write takes as long as a call to the API server does; one may fail on demand."""

    def __init__(self, delay: float = 0.02) -> None:
        super().__init__()
        self.delay, self.fail_next = delay, False

    def set(self, key, value):
        time.sleep(self.delay)
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("the API server went away")
        super().set(key, value)


def _serve_until(writer: LedgerWriter, threads: list[threading.Thread]) -> None:
    """The task's own thread serves the others' changes until they are all done."""
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        writer.serve(timeout=0.01)


def test_threads_committing_at_once_share_writes_and_each_returns_once_its_change_is_stored():
    store = SlowStore()
    entry = LedgerEntry(slots=[Slot(key=f"k{i}") for i in range(12)])
    writer = LedgerWriter(SubmissionLedger({"task_state_store": store}), entry)
    seen_on_return: dict[int, bool] = {}

    def mark(i: int) -> None:
        writer.commit(lambda: setattr(entry.slots[i], "sending", True))
        seen_on_return[i] = store.get(STATE_KEY)["slots"][i]["sending"]

    _serve_until(writer, [threading.Thread(target=mark, args=(i,)) for i in range(12)])
    assert seen_on_return == {i: True for i in range(12)}
    assert writer.writes == len(store.writes) < 12  # grouped
    # No write ever goes back: each holds every mark the one before it held.
    marked = [{i for i, s in enumerate(w["slots"]) if s["sending"]} for w in store.writes]
    assert all(a <= b for a, b in itertools.pairwise(marked))


def test_changes_are_made_by_the_writers_own_thread_only():
    entry = LedgerEntry(slots=[Slot(key="a")])
    writer = LedgerWriter(SubmissionLedger({"task_state_store": SlowStore(delay=0)}), entry)
    ran_in: list[int] = []
    thread = threading.Thread(target=writer.commit, args=(lambda: ran_in.append(threading.get_ident()),))
    _serve_until(writer, [thread])
    assert ran_in == [threading.get_ident()]


def test_a_change_not_made_durable_goes_with_the_next_write():
    store = SlowStore(delay=0)
    entry = LedgerEntry(slots=[Slot(key="a"), Slot(key="b")])
    writer = LedgerWriter(SubmissionLedger({"task_state_store": store}), entry)
    writer.commit(lambda: setattr(entry.slots[0], "message", "later"), durable=False)
    assert store.writes == []
    writer.commit(lambda: setattr(entry.slots[1], "sending", True))
    assert [s["message"] for s in store.get(STATE_KEY)["slots"]] == ["later", ""]
    assert len(store.writes) == 1


def test_a_failed_write_fails_the_thread_waiting_for_it_and_the_next_write_stores_everything():
    store = SlowStore(delay=0)
    entry = LedgerEntry(slots=[Slot(key="a")])
    writer = LedgerWriter(SubmissionLedger({"task_state_store": store}), entry)
    store.fail_next = True
    failures: list[BaseException] = []

    def mark() -> None:
        try:
            writer.commit(lambda: setattr(entry.slots[0], "sending", True))
        except ConnectionError as error:
            failures.append(error)

    thread = threading.Thread(target=mark)
    thread.start()
    with pytest.raises(ConnectionError):
        writer.serve(timeout=5)
    thread.join()
    assert len(failures) == 1
    assert store.get(STATE_KEY) is None
    writer.commit()
    assert store.get(STATE_KEY)["slots"][0]["sending"] is True
