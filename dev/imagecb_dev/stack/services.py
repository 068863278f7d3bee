"""
The services a stack stands on: the local PostgreSQL (one database per stack) and Redis.

Each is probed with a short timeout before anything else happens, so an absent service fails
the stack at once with :class:`StackUnavailable` (naming the service, the address and how to
start it) instead of a hang inside Airflow.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil

from imagecb_dev.stack.errors import StackError, StackUnavailable

if TYPE_CHECKING:
    import redis

POSTGRES_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
REDIS_START = (
    'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no '
    "--dir /var/lib/redis --logfile /var/log/redis/ci.log"
)
#: Every database a stack creates starts with this; its comment names the owning process.
DATABASE_PREFIX = "imagecb_stack_"
#: The key that marks a Redis database index as taken by a stack (value: the owner, as JSON).
REDIS_OWNER_KEY = "imagecb_stack:owner"


def owner_tag() -> dict[str, Any]:
    """Return what identifies this process across machines and pid reuse."""
    me = psutil.Process()
    return {"host": socket.gethostname(), "pid": me.pid, "started": round(me.create_time(), 2)}


def owner_is_gone(tag: dict[str, Any]) -> bool:
    """
    Tell whether the process a tag names has ended (only decidable on this host).

    :param tag: a tag made by :func:`owner_tag`
    """
    if tag.get("host") != socket.gethostname():
        return False
    try:
        process = psutil.Process(int(tag["pid"]))
        return abs(process.create_time() - float(tag["started"])) > 1 or process.status() == "zombie"
    except (psutil.NoSuchProcess, KeyError, TypeError, ValueError):
        return True


def _port_answers(host: str, port: int, timeout: float) -> str:
    """Return "" when a TCP connection to host:port succeeds, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return ""
    except OSError as error:
        return f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class Postgres:
    """
    The local PostgreSQL server (trust authentication).

    :param host: its address
    :param port: its port
    :param user: the superuser the stack connects as (no password)
    :param connect_timeout: seconds before a connection attempt gives up
    """

    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    connect_timeout: int = 3

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def sqlalchemy_url(self, database: str) -> str:
        """Return Airflow's ``sql_alchemy_conn`` for one database."""
        return f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/{database}"

    def celery_result_backend(self, database: str) -> str:
        """Return Celery's ``result_backend`` URL for one database."""
        return f"db+postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> Any:
        """
        Open an autocommit connection, or raise :class:`StackUnavailable` at once.

        :param database: the database to connect to
        """
        import psycopg2

        reason = _port_answers(self.host, self.port, self.connect_timeout)
        if reason:
            raise StackUnavailable("PostgreSQL", self.address, POSTGRES_START, reason)
        try:
            conn = psycopg2.connect(
                host=self.host,
                port=self.port,
                user=self.user,
                dbname=database,
                connect_timeout=self.connect_timeout,
                application_name="imagecb-stack",
            )
        except psycopg2.OperationalError as error:
            raise StackUnavailable("PostgreSQL", self.address, POSTGRES_START, str(error)) from None
        conn.autocommit = True
        return conn

    def check(self) -> None:
        """Raise :class:`StackUnavailable` unless the server answers a query."""
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        finally:
            conn.close()

    def create_database(self, template: str | None = None) -> str:
        """
        Create a database with a unique name, tagged with its owner; return the name.

        :param template: copy this database (it must have no session connected)
        """
        name = f"{DATABASE_PREFIX}{secrets.token_hex(5)}"
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
                cur.execute(f'COMMENT ON DATABASE "{name}" IS %s', (json.dumps(owner_tag()),))
        finally:
            conn.close()
        return name

    def drop_database(self, name: str) -> None:
        """
        Drop a stack database, ending any session still connected to it.

        :param name: the database, which must start with :data:`DATABASE_PREFIX`
        """
        if not name.startswith(DATABASE_PREFIX):
            raise StackError(f"refusing to drop {name!r}: not a stack database")
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            conn.close()

    def stack_databases(self) -> dict[str, dict[str, Any]]:
        """Return every stack database with its owner tag (empty when the comment is missing)."""
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database "
                    "WHERE datname LIKE %s",
                    (DATABASE_PREFIX.replace("_", r"\_") + "%",),
                )
                rows = cur.fetchall()
        finally:
            conn.close()
        return {name: _json_or_empty(comment) for name, comment in rows}

    def mark_kept(self, name: str) -> None:
        """
        Mark a stack database as kept on purpose, so sweeps leave it alone.

        :param name: the database
        """
        tag = owner_tag() | {"kept": True}
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f'COMMENT ON DATABASE "{name}" IS %s', (json.dumps(tag),))
        finally:
            conn.close()

    def drop_stale_databases(self, *, kept: bool = False) -> list[str]:
        """
        Drop the stack databases whose owning process on this host has ended; return them.

        :param kept: also those kept on purpose (``keep=True``)
        """
        stale = [
            name
            for name, tag in self.stack_databases().items()
            if tag and owner_is_gone(tag) and (kept or not tag.get("kept"))
        ]
        for name in stale:
            self.drop_database(name)
        return stale


def _json_or_empty(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class Redis:
    """
    The local Redis server; each Celery stack takes one database index of it.

    :param host: its address
    :param port: its port
    :param connect_timeout: seconds before a connection attempt gives up
    """

    host: str = "127.0.0.1"
    port: int = 6379
    connect_timeout: float = 2.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def broker_url(self, index: int) -> str:
        """Return Celery's ``broker_url`` for one database index."""
        return f"redis://{self.host}:{self.port}/{index}"

    def client(self, index: int = 0) -> redis.Redis:
        """
        Return a client of one database index.

        :param index: the database index
        """
        import redis

        return redis.Redis(
            host=self.host,
            port=self.port,
            db=index,
            socket_connect_timeout=self.connect_timeout,
            socket_timeout=self.connect_timeout * 5,
        )

    def check(self) -> None:
        """Raise :class:`StackUnavailable` unless the server answers PING."""
        import redis

        reason = _port_answers(self.host, self.port, self.connect_timeout)
        if reason:
            raise StackUnavailable("Redis", self.address, REDIS_START, reason)
        try:
            self.client().ping()
        except redis.RedisError as error:
            raise StackUnavailable("Redis", self.address, REDIS_START, str(error)) from None

    def _database_count(self) -> int:
        try:
            return int(self.client().config_get("databases").get("databases", 16))
        except Exception:
            return 16

    def claim_database(self) -> int:
        """
        Take a free database index (1 and up; one left by an ended stack counts as free), flush it.

        An index holding keys but no owner mark belongs to someone else and is never touched.
        """
        tag = json.dumps(owner_tag())
        for index in range(1, self._database_count()):
            client = self.client(index)
            owner = client.get(REDIS_OWNER_KEY)
            if owner is None and client.dbsize() == 0 and client.set(REDIS_OWNER_KEY, tag, nx=True):
                return self._flush_keeping(client, tag, expected=tag)
            if owner is not None and owner_is_gone(_json_or_empty(owner.decode())):
                try:
                    return self._flush_keeping(client, tag, expected=owner.decode())
                except _Lost:
                    continue
        raise StackError(f"no free Redis database index on {self.address}: all are taken")

    def _flush_keeping(self, client: redis.Redis, tag: str, *, expected: str) -> int:
        """Flush the index and mark it ours, atomically, if its owner is still ``expected``."""
        import redis

        with client.pipeline() as pipe:
            try:
                pipe.watch(REDIS_OWNER_KEY)
                current = pipe.get(REDIS_OWNER_KEY)
                if current is None or current.decode() != expected:
                    raise _Lost
                pipe.multi()
                pipe.flushdb()
                pipe.set(REDIS_OWNER_KEY, tag)
                pipe.execute()
            except redis.WatchError:
                raise _Lost from None
        return int(client.connection_pool.connection_kwargs["db"])

    def release_database(self, index: int) -> None:
        """
        Flush a database index this process claimed (which frees it).

        :param index: the index :meth:`claim_database` returned
        """
        client = self.client(index)
        owner = _json_or_empty((client.get(REDIS_OWNER_KEY) or b"").decode())
        if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            client.flushdb()

    def release_stale_databases(self) -> list[int]:
        """Flush the indexes whose owning stack process has ended; return them."""
        released = []
        for index in range(1, self._database_count()):
            client = self.client(index)
            owner = client.get(REDIS_OWNER_KEY)
            if owner is not None and owner_is_gone(_json_or_empty(owner.decode())):
                client.flushdb()
                released.append(index)
        return released


class _Lost(Exception):
    """Another stack took the index first."""
