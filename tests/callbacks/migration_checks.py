"""
The upgrade of a database the provider's revision 0001 made, with rows in it, shared by the SQLite
and PostgreSQL tests: what is put in before, and what must hold after.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from imagecb_provider.callbacks.store import CallbackStore, NewCallback

REVISION_0001 = "0001_imagecb_callback"
HEAD = "0002_imagecb_task_per_purpose"
RECEIVED = "2026-07-01 12:00:00.000000"  # UTC, as both dialects store it for the store
_BODY = (
    '{"code":200,"msg":"success","data":{"taskId":"%s","info":{"resultImageUrl":"https://f.example/%s.png"}}}'
)


def fill_0001(engine: sa.Engine) -> dict[str, Any]:
    """
    Put rows into a database at revision 0001, the way its store wrote them; return what was put.

    Five callbacks, the newest of which was purged (its id must never be handed out again), a
    cursor stalled beyond every id (what a ``PUT cursors`` could store before) and a sane one.
    """
    rows = [
        ("t-ti-1", "c", "ti", None),
        ("t-asset-1", "c", "asset", "studio"),
        ("t-ti-2", "c", "ti", None),
        ("t-other-conn", "d", "ti", None),
        ("t-purged", "c", "ti", None),
    ]
    with engine.begin() as conn:
        ids = []
        for remote_task_id, conn_id, purpose, label in rows:
            ids.append(
                conn.execute(
                    sa.text(
                        "INSERT INTO imagecb_callback (remote_task_id, conn_id, purpose, label, code, body, "
                        "signed, received_at) VALUES (:r, :c, :p, :l, 200, :b, :s, :t) RETURNING id"
                    ),
                    {
                        "r": remote_task_id,
                        "c": conn_id,
                        "p": purpose,
                        "l": label,
                        "b": _BODY % (remote_task_id, remote_task_id),
                        "s": False,
                        "t": RECEIVED,
                    },
                ).scalar_one()
            )
        conn.execute(sa.text("DELETE FROM imagecb_callback WHERE remote_task_id = 't-purged'"))
        for name, position in (("asset:studio", 10**12), ("asset:*", ids[1])):
            conn.execute(
                sa.text(
                    "INSERT INTO imagecb_callback_cursor (conn_id, name, position, updated_at) "
                    "VALUES ('c', :n, :p, :t)"
                ),
                {"n": name, "p": position, "t": RECEIVED},
            )
    return {"ids": ids[:4], "purged": ids[4], "tasks": [r[0] for r in rows[:4]]}


def check_upgraded(engine: sa.Engine, before: dict[str, Any]) -> None:
    """
    Check a database :func:`fill_0001` filled, once upgraded to the head revision.

    :param engine: the upgraded database.
    :param before: what :func:`fill_0001` returned.
    """
    inspector = sa.inspect(engine)
    with engine.connect() as conn:
        version = conn.execute(sa.text("SELECT version_num FROM imagecb_alembic_version")).scalar_one()
        kept = conn.execute(sa.text("SELECT id, remote_task_id FROM imagecb_callback ORDER BY id")).all()
        cursors = dict(conn.execute(sa.text("SELECT name, position FROM imagecb_callback_cursor")).all())
    assert version == HEAD, version
    assert [tuple(r) for r in kept] == list(zip(before["ids"], before["tasks"], strict=True)), kept
    uniques = [u["column_names"] for u in inspector.get_unique_constraints("imagecb_callback")]
    assert uniques == [["conn_id", "purpose", "remote_task_id"]], uniques
    indexes = {i["name"]: i["column_names"] for i in inspector.get_indexes("imagecb_callback")}
    assert indexes.get("idx_imagecb_callback_label") == ["conn_id", "label", "received_at"], indexes
    latest = max(before["ids"])
    assert cursors == {"asset:studio": latest, "asset:*": before["ids"][1]}, cursors  # unstalled

    store = CallbackStore(engine)
    body = {"code": 200, "msg": "success", "data": {"taskId": "t-ti-1", "info": {}}}
    claim = NewCallback("t-ti-1", "c", "asset", body, False, datetime.now(UTC), label="studio")
    new_id = store.record(claim)  # unique per purpose now: not a duplicate of the ti row
    assert new_id is not None, "the asset callback of a ti task id was taken for a duplicate"
    assert new_id > before["purged"], f"id {new_id} handed out again (a purged row had {before['purged']})"
    assert store.record(NewCallback("t-ti-2", "c", "ti", body, False, datetime.now(UTC))) is None
    (old,) = store.lookup("c", ["t-ti-2"], purpose="ti")
    assert old.body["data"]["info"]["resultImageUrl"] == "https://f.example/t-ti-2.png"
    assert store.advance_cursor("c", "asset:studio", 10**12) == new_id
