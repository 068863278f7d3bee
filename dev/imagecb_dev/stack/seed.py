"""
Put a stack's pools, variables and connections into its database before any component starts.

Rows are written with plain SQL into Airflow's ``slot_pool``, ``variable`` and ``connection``
tables, unencrypted (``is_encrypted`` false, which Airflow reads as plain text), so no Airflow
import is needed. Connections given as URIs need Airflow's URI parser: :func:`uri_connections`
picks them out for :mod:`._bootstrap` to store.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from imagecb_dev.stack.services import Postgres

#: Fields of a connection's JSON form that are columns of the ``connection`` table.
CONNECTION_COLUMNS = ("conn_type", "description", "host", "schema", "login", "password", "port")


def uri_connections(connections: Mapping[str, str]) -> dict[str, str]:
    """
    Return the connections given as URIs rather than JSON.

    :param connections: conn_id -> JSON object or URI
    """
    return {conn_id: value for conn_id, value in connections.items() if not value.lstrip().startswith("{")}


def connection_row(conn_id: str, value: str) -> dict[str, Any]:
    """
    Turn a connection's JSON form into a ``connection`` row.

    :param conn_id: the connection id
    :param value: ``{"conn_type", "host", "login", "password", "schema", "port", "extra", ...}``
    """
    fields = json.loads(value)
    unknown = set(fields) - {*CONNECTION_COLUMNS, "extra"}
    if unknown or "conn_type" not in fields:
        raise ValueError(f"connection {conn_id!r}: needs conn_type; unknown fields {sorted(unknown)}")
    extra = fields.get("extra")
    row = {column: fields.get(column) for column in CONNECTION_COLUMNS}
    row |= {
        "conn_id": conn_id,
        "port": int(fields["port"]) if fields.get("port") not in (None, "") else None,
        "extra": json.dumps(extra) if isinstance(extra, dict) else extra,
        "is_encrypted": False,
        "is_extra_encrypted": False,
    }
    return row


def seed(
    postgres: Postgres,
    database: str,
    *,
    pools: Mapping[str, Mapping[str, Any]],
    variables: Mapping[str, Any],
    connections: Mapping[str, str],
) -> None:
    """
    Write pools, variables and JSON connections into a migrated database (upserts).

    :param postgres: the server
    :param database: the stack's database
    :param pools: name -> ``{"slots", "include_deferred", "description"}``
    :param variables: key -> value (non-strings stored as JSON)
    :param connections: conn_id -> JSON object (URIs are skipped: see :func:`uri_connections`)
    """
    conn = postgres.connect(database)
    try:
        with conn.cursor() as cur:
            for name, spec in pools.items():
                cur.execute(
                    "INSERT INTO slot_pool (pool, slots, description, include_deferred) "
                    "VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (pool) DO UPDATE SET slots = EXCLUDED.slots, "
                    "description = EXCLUDED.description, include_deferred = EXCLUDED.include_deferred",
                    (
                        name,
                        int(spec["slots"]),
                        spec.get("description", ""),
                        bool(spec.get("include_deferred")),
                    ),
                )
            for key, value in variables.items():
                text = value if isinstance(value, str) else json.dumps(value, indent=2)
                cur.execute(
                    "INSERT INTO variable (key, val, is_encrypted) VALUES (%s, %s, false) "
                    "ON CONFLICT (key) DO UPDATE SET val = EXCLUDED.val, is_encrypted = false",
                    (key, text),
                )
            for conn_id, value in connections.items():
                if conn_id in uri_connections({conn_id: value}):
                    continue
                row = connection_row(conn_id, value)
                columns = ", ".join(row)
                cur.execute("DELETE FROM connection WHERE conn_id = %s", (conn_id,))
                cur.execute(
                    f"INSERT INTO connection ({columns}) VALUES ({', '.join(['%s'] * len(row))})",
                    tuple(row.values()),
                )
    finally:
        conn.close()
