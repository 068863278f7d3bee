"""
A migrated template database, so a new stack's database is a 0.2 s copy instead of a migration.

``airflow db migrate`` costs about 3 s of CPU on this 2-core machine, at the moment the four
components compete for the same cores; ``CREATE DATABASE new TEMPLATE tpl`` costs nothing on
our side. The template is named after a fingerprint of what decides the schema (see
:func:`fingerprint`: ``imagecb_stacktpl_<hash>``), built once under an advisory lock, and
closed to connections (PostgreSQL refuses to copy a database someone is connected to). It stays
between runs, as a cache; templates of other fingerprints are dropped 10 minutes after they
were built, and ``python -m imagecb_dev.stack cleanup --templates`` drops all.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from imagecb_dev.stack.errors import StackError
from imagecb_dev.stack.processes import tail_file
from imagecb_dev.stack.services import Postgres

TEMPLATE_PREFIX = "imagecb_stacktpl_"
_LOCK_KEY = 0x1A6E_CB57  # pg_advisory_lock key of template builds
# The provider package whose tables decide the schema (found without importing it).
_PROVIDER = Path(importlib.util.find_spec("imagecb_provider").origin).parent
#: Templates of other fingerprints built this long ago are dropped when a new one is built.
STALE_TEMPLATE_SECONDS = 600


def fingerprint(extra_env: Mapping[str, str] | None = None) -> str:
    """
    Return a short hash of what decides the schema.

    That is the installed Airflow and provider distributions, ``AIRFLOW__DATABASE__*``
    settings, and this provider's tables (it owns some through ``db-managers``): its provider
    info, every ``migrations`` folder and the modules beside one (the schema, the DB manager).
    A change to any of them means one new migration (about 3 s), once.

    :param extra_env: the stack's extra variables
    """
    digest = hashlib.sha256()
    for dist in sorted(
        f"{dist.metadata['Name']}=={dist.version}"
        for dist in importlib.metadata.distributions()
        if (dist.metadata["Name"] or "").lower().startswith(("apache-airflow", "airflow-provider"))
    ):
        digest.update(dist.encode())
    for path in _schema_files():
        digest.update(str(path.relative_to(_PROVIDER)).encode() + path.read_bytes())
    for key, value in sorted((extra_env or {}).items()):
        if key.startswith("AIRFLOW__DATABASE__"):
            digest.update(f"{key}={value}".encode())
    return digest.hexdigest()[:12]


def _schema_files() -> list[Path]:
    files = {_PROVIDER / "get_provider_info.py"}
    for migrations in _PROVIDER.rglob("migrations"):
        if migrations.is_dir():
            files |= set(migrations.rglob("*.py")) | set(migrations.parent.glob("*.py"))
    return sorted(path for path in files if path.is_file() and "__pycache__" not in path.parts)


def _exists(postgres: Postgres, name: str) -> bool:
    conn = postgres.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            return cur.fetchone() is not None
    finally:
        conn.close()


def ensure_template(postgres: Postgres, migrate_env: Mapping[str, str], timeout: float = 300.0) -> str:
    """
    Return the template database for the installed Airflow, building it first if missing.

    :param postgres: the server
    :param migrate_env: the environment of the migration (the stack's, minus its database)
    :param timeout: seconds allowed to wait for another build and to migrate
    """
    name = TEMPLATE_PREFIX + fingerprint(migrate_env)
    if _exists(postgres, name):
        _drop_old_templates(postgres, keep=name)
        return name
    lock = postgres.connect()
    try:
        with lock.cursor() as cur:
            cur.execute(f"SET lock_timeout = '{int(timeout)}s'")
            cur.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        if not _exists(postgres, name):  # nobody built it while we waited
            _build(postgres, name, migrate_env, timeout)
    finally:
        lock.close()  # ends the session, which releases the advisory lock
    _drop_old_templates(postgres, keep=name)
    return name


def _build(postgres: Postgres, name: str, migrate_env: Mapping[str, str], timeout: float) -> None:
    building = f"{name}_building"
    conn = postgres.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{building}" WITH (FORCE)')
            cur.execute(f'CREATE DATABASE "{building}"')
        _migrate(postgres, building, migrate_env, timeout)
        with conn.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{building}" RENAME TO "{name}"')
            cur.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            cur.execute(f'COMMENT ON DATABASE "{name}" IS %s', (json.dumps({"built": time.time()}),))
    finally:
        conn.close()


def _drop_old_templates(postgres: Postgres, keep: str) -> None:
    """Drop the templates of other fingerprints built long ago (one per schema change adds up)."""
    for name, built in _templates(postgres).items():
        if name != keep and time.time() - built > STALE_TEMPLATE_SECONDS:
            _drop(postgres, name)


def _templates(postgres: Postgres) -> dict[str, float]:
    conn = postgres.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
                "WHERE datname LIKE %s",
                (TEMPLATE_PREFIX.replace("_", r"\_") + "%",),
            )
            rows = cur.fetchall()
    finally:
        conn.close()
    return {name: float(_built(comment)) for name, comment in rows}


def _built(comment: str | None) -> float:
    try:
        return float(json.loads(comment or "{}").get("built", 0))
    except (ValueError, AttributeError):
        return 0.0


def _drop(postgres: Postgres, name: str) -> None:
    conn = postgres.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


def _migrate(postgres: Postgres, database: str, migrate_env: Mapping[str, str], timeout: float) -> None:
    with tempfile.TemporaryDirectory(prefix="imagecb-stacktpl-") as home:
        spec = Path(home) / "spec.json"
        spec.write_text(json.dumps({"migrate": True}))
        log = Path(home) / "migrate.log"
        env = dict(migrate_env) | {
            "AIRFLOW_HOME": home,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres.sqlalchemy_url(database),
        }
        argv = [sys.executable, "-m", "imagecb_dev.stack._bootstrap", str(spec)]
        with log.open("wb") as out:
            try:
                result = subprocess.run(
                    argv,
                    env=env,
                    cwd=home,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise StackError(
                    f"migrating the template took over {timeout:g}s:\n{tail_file(log)}"
                ) from None
        if result.returncode:
            raise StackError(f"migrating the template failed (exit {result.returncode}):\n{tail_file(log)}")


def drop_templates(postgres: Postgres) -> list[str]:
    """
    Drop every template database (they are rebuilt on demand); return their names.

    :param postgres: the server
    """
    names = list(_templates(postgres))
    for name in names:
        _drop(postgres, name)
    return names
