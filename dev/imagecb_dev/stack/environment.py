"""
The configuration every process of a stack shares, as environment variables.

Settings are passed as ``AIRFLOW__SECTION__KEY`` variables, never through ``airflow.cfg``, so
each process sees exactly the same values; the harness's own ``AIRFLOW*`` variables (for
example a test session's ``AIRFLOW_HOME``) are not inherited.
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: The directory holding ``airflow`` and ``python`` of the running interpreter's environment.
SCRIPTS_DIR = Path(sysconfig.get_path("scripts"))
#: How often (s) the DAG processor lists the DAG folder for new files (Airflow's default: 300).
DAG_REFRESH_INTERVAL = 5


def free_port(host: str = "127.0.0.1") -> int:
    """
    Return a TCP port nothing listens on right now.

    :param host: the address to check on
    """
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """
    Tell whether a port can be bound on an address.

    :param port: the port
    :param host: the address
    """
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class Secrets:
    """Keys all processes of one stack must share (tasks authenticate with the JWT secret)."""

    fernet_key: str
    jwt_secret: str
    api_secret_key: str

    @classmethod
    def generate(cls) -> Secrets:
        """Make fresh random keys."""
        return cls(
            fernet_key=base64.urlsafe_b64encode(os.urandom(32)).decode(),
            jwt_secret=secrets.token_urlsafe(32),
            api_secret_key=secrets.token_urlsafe(32),
        )


@dataclass(frozen=True)
class StackSettings:
    """
    What :func:`airflow_env` needs to know about one stack.

    :param airflow_home: the stack's ``AIRFLOW_HOME``
    :param sql_alchemy_conn: the metadata database URL
    :param executor: ``LocalExecutor`` or ``CeleryExecutor``
    :param parallelism: ``[core] parallelism`` (and the Celery worker's concurrency)
    :param dags_folder: the DAG folder
    :param plugins_folder: the plugins folder
    :param api_host: the address the API server binds
    :param api_port: the API server's port
    :param worker_log_port: the port task logs are served on by the scheduler/worker
    :param trigger_log_port: the port trigger logs are served on by the triggerer
    :param users: ``[core] simple_auth_manager_users`` (``name:role,...``)
    :param passwords_file: the JSON file of user -> password
    :param secrets: the shared keys
    :param use_job_schedule: whether the scheduler makes runs from schedules
    :param celery_broker: the Celery broker URL (Celery only)
    :param celery_result_backend: the Celery result backend URL (Celery only)
    :param api_workers: the API server's worker processes
    :param archive_roots: the folders and buckets the provider's contact sheet may read
        (``[imagecb] archive_roots``); none: the setting is left unset
    """

    airflow_home: Path
    sql_alchemy_conn: str
    executor: str
    parallelism: int
    dags_folder: Path
    plugins_folder: Path
    api_host: str
    api_port: int
    worker_log_port: int
    trigger_log_port: int
    users: str
    passwords_file: Path
    secrets: Secrets
    use_job_schedule: bool = False
    celery_broker: str | None = None
    celery_result_backend: str | None = None
    api_workers: int = 1
    archive_roots: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        """The API server's base URL (``localhost``: what the UI's links and redirects use)."""
        return f"http://localhost:{self.api_port}"


#: The provider's ``[imagecb] archive_roots``: where the contact sheet may read reports and images.
ARCHIVE_ROOTS_ENV = "AIRFLOW__IMAGECB__ARCHIVE_ROOTS"
#: Seconds after its last heartbeat that a triggerer counts as dead (Airflow's default is 30).
TRIGGERER_HEALTH_CHECK_THRESHOLD = 15


def airflow_env(settings: StackSettings) -> dict[str, str]:
    """
    Return the ``AIRFLOW*`` variables of a stack.

    :param settings: the stack's settings
    """
    env = {
        "AIRFLOW_HOME": str(settings.airflow_home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": settings.sql_alchemy_conn,
        "AIRFLOW__CORE__EXECUTOR": settings.executor,
        "AIRFLOW__CORE__PARALLELISM": str(settings.parallelism),
        "AIRFLOW__CORE__DAGS_FOLDER": str(settings.dags_folder),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(settings.plugins_folder),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
        "AIRFLOW__CORE__FERNET_KEY": settings.secrets.fernet_key,
        "AIRFLOW__API_AUTH__JWT_SECRET": settings.secrets.jwt_secret,
        "AIRFLOW__API__SECRET_KEY": settings.secrets.api_secret_key,
        "AIRFLOW__API__HOST": settings.api_host,
        "AIRFLOW__API__PORT": str(settings.api_port),
        "AIRFLOW__API__WORKERS": str(settings.api_workers),
        "AIRFLOW__API__BASE_URL": settings.url,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{settings.url}/execution/",
        "AIRFLOW__CORE__AUTH_MANAGER": (
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
        ),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": settings.users,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(settings.passwords_file),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": str(settings.use_job_schedule),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": str(DAG_REFRESH_INTERVAL),
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(settings.worker_log_port),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(settings.trigger_log_port),
        # A triggerer started after one was killed takes over its triggers once the dead one's
        # last heartbeat (every 5 s) is this old: 15 s instead of 30 s, with room for a busy machine.
        "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": str(TRIGGERER_HEALTH_CHECK_THRESHOLD),
    }
    if settings.archive_roots:
        env[ARCHIVE_ROOTS_ENV] = ",".join(settings.archive_roots)
    if settings.executor == "CeleryExecutor":
        env |= {
            "AIRFLOW__CELERY__BROKER_URL": settings.celery_broker or "",
            "AIRFLOW__CELERY__RESULT_BACKEND": settings.celery_result_backend or "",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(settings.parallelism),
        }
    return env


def process_env(airflow: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """
    Return the full environment of a stack process: this one's without ``AIRFLOW*``, plus the stack's.

    :param airflow: the stack's variables (:func:`airflow_env`)
    :param extra: the caller's variables, which win
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    env["PATH"] = os.pathsep.join([str(SCRIPTS_DIR), env.get("PATH", "")])
    return env | dict(airflow) | dict(extra or {})


def shell_exports(env: Mapping[str, str]) -> str:
    """
    Render variables as ``export`` lines a shell can ``source``.

    :param env: the variables
    """
    import shlex

    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in sorted(env.items()))
