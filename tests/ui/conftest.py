"""
Fixtures for the contact sheet tests: Airflow's own API server app (with the provider's plugin
mounted the way ``airflow api-server`` mounts it), tokens of real users, and finished runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

CONN_ENV = "AIRFLOW_CONN_IMAGECB_DEFAULT"


@pytest.fixture(scope="module")
def api_app(airflow_db) -> Iterator[Any]:
    """Airflow's API server app (``airflow.api_fastapi.app.create_app``), plugins included."""
    import secrets

    from airflow.api_fastapi.app import create_app

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_urlsafe(48))
        yield create_app()


@pytest.fixture
def api(api_app) -> Iterator[Any]:
    """An HTTP client of the API server app, without any credential."""
    from fastapi.testclient import TestClient

    with TestClient(api_app, follow_redirects=False) as client:
        yield client


@pytest.fixture
def viewer(api, token_for) -> Any:
    """The client, logged in as a viewer through the ``_token`` cookie (as a browser is)."""
    api.cookies.set("_token", token_for("viewer"))
    return api


@pytest.fixture(scope="module")
def token_for(api_app) -> Callable[[str | None], str]:
    """``token_for(role)``: a JWT the API server's auth manager signed for a user of that role."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    def token(role: str | None) -> str:
        return get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=f"user-{role}", role=role))

    return token


@pytest.fixture(scope="module")
def fast_simulator() -> Iterator[Any]:
    """A simulator (latency 0.2 s) that ``imagecb_default`` points at for the whole module."""
    from imagecb_provider.testing.simulator import run_in_thread

    with run_in_thread(latency=0.2) as simulator, pytest.MonkeyPatch.context() as patch:
        patch.setenv(CONN_ENV, simulator.connection_json())
        yield simulator


@pytest.fixture(scope="module")
def run_module_dag(airflow_db) -> Callable[..., Any]:
    """Like ``run_dag``, for module-scoped fixtures: register a DAG as the scheduler would, run it."""
    from imagecb_provider.testing.airflow import run_dag_test

    return run_dag_test


@pytest.fixture(scope="module")
def runs(run_module_dag, fast_simulator, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """
    Two finished runs of batch-like DAGs: ``with_report`` and ``without_report`` (see ``uihelpers``).

    The archive root ``with_report`` writes to is the one archive root configured meanwhile.
    """
    from uihelpers import make_runs

    from imagecb_provider.ui.roots import ENV_VAR

    made = make_runs(run_module_dag, tmp_path_factory)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_VAR, str(made["with_report"].root))
        yield made
