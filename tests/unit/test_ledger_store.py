"""
A change to the ledger reaches ``task_state_store`` only through a save, as in Airflow.

Airflow's store keeps JSON in its database: a value read is a fresh copy and a value set is
copied at once. The in-memory stand-in must behave the same, or a missing ``save()`` is invisible
to every test that uses it.
"""

from __future__ import annotations

import pytest

from imagecb_provider.testing.airflow import InMemoryTaskStateStore
from imagecb_provider.utils.ledger import STATE_KEY, LedgerEntry, Slot, SubmissionLedger


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
