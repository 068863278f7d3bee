"""
Prepare a stack's database in one process: migrate it, then create pools, connections, variables.

Run as ``python -m imagecb_dev.stack._bootstrap SPEC.json`` with the stack's
environment. It calls what ``airflow db migrate`` calls (``airflow.utils.db.upgradedb``, which
builds a new database from the ORM models), so Airflow is imported once, not once per CLI call.
The spec is ``{"migrate": bool, "pools": {name: {"slots", "include_deferred", "description"}},
"connections": {conn_id: JSON or URI}, "variables": {key: value}}``; each part is optional.
The harness itself uses it to migrate (a template database, or a stack's own without one) and
for connections given as URIs; pools, variables and JSON connections it writes with SQL
(:mod:`.seed`).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def migrate() -> None:
    """Create or upgrade the metadata database, as ``airflow db migrate`` does."""
    from airflow.utils import db

    db.upgradedb()


def create_pools(pools: dict[str, dict[str, Any]]) -> None:
    """
    Create or update pools.

    :param pools: name -> ``{"slots", "include_deferred", "description"}``
    """
    from airflow.models.pool import Pool

    for name, spec in pools.items():
        Pool.create_or_update_pool(
            name=name,
            slots=int(spec["slots"]),
            description=spec.get("description", ""),
            include_deferred=bool(spec.get("include_deferred", False)),
        )


def create_connections(connections: dict[str, str]) -> None:
    """
    Create connections, replacing any with the same id.

    :param connections: conn_id -> a JSON object or a URI
    """
    from airflow.models.connection import Connection
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    with create_session() as session:
        for conn_id, value in connections.items():
            session.execute(delete(Connection).where(Connection.conn_id == conn_id))
            if value.lstrip().startswith("{"):
                conn = Connection.from_json(value, conn_id=conn_id)
            else:
                conn = Connection(conn_id=conn_id, uri=value)
            session.add(conn)


def create_variables(variables: dict[str, Any]) -> None:
    """
    Set variables; values that are not strings are stored as JSON.

    :param variables: key -> value
    """
    from airflow.models.variable import Variable

    for key, value in variables.items():
        Variable.set(key, value, serialize_json=not isinstance(value, str))


def main(argv: list[str]) -> int:
    with open(argv[1]) as handle:
        spec = json.load(handle)
    steps = {
        "migrate": migrate,
        "pools": lambda: create_pools(spec["pools"]),
        "connections": lambda: create_connections(spec["connections"]),
        "variables": lambda: create_variables(spec["variables"]),
    }
    for name, step in steps.items():
        if spec.get(name):
            began = time.monotonic()
            step()
            print(f"bootstrap: {name} done in {time.monotonic() - began:.2f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
