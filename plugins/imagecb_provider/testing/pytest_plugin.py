"""
pytest fixtures that start the image API simulator on a free port, for testing DAGs that use the provider.

Load with ``-p imagecb_provider.testing.pytest_plugin`` or ``pytest_plugins = [...]``. The
simulator is imported inside the fixtures, so merely loading the plugin costs nothing and works
without the simulator's extra dependencies installed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from imagecb_provider.testing.simulator import RunningSimulator

CONN_ENV = "AIRFLOW_CONN_IMAGECB_DEFAULT"


@pytest.fixture
def imagecb_simulator_factory() -> Iterator[Callable[..., RunningSimulator]]:
    """``start(**config_fields)`` starts an in-thread simulator; all are stopped after the test."""
    from imagecb_provider.testing.simulator import run_in_thread

    with ExitStack() as stack:

        def start(**config_fields: Any) -> RunningSimulator:
            return stack.enter_context(run_in_thread(**config_fields))

        yield start


@pytest.fixture
def imagecb_simulator(
    imagecb_simulator_factory: Callable[..., RunningSimulator], monkeypatch: pytest.MonkeyPatch
) -> RunningSimulator:
    """A fast simulator (latency 0.2 s) that ``imagecb_default`` points at for this test."""
    simulator = imagecb_simulator_factory(latency=0.2)
    monkeypatch.setenv(CONN_ENV, simulator.connection_json())
    return simulator
