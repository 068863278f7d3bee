"""
:class:`SharedStacks`: one running stack per configuration, handed to every caller that asks
for that configuration (a stack costs tens of seconds to start; a test needs a few).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from imagecb_dev.stack.core import AirflowStack

log = logging.getLogger(__name__)


def _key(options: dict[str, Any]) -> str:
    return json.dumps(options, sort_keys=True, default=str)


class SharedStacks:
    """
    Start stacks on demand and share them by configuration.

    At most ``max_running`` stacks run at once: asking for another configuration stops the
    one used longest ago (a 2-core machine runs one stack well, not three). A stack handed out
    again is checked first: components left down by an earlier test are restarted.

    :param max_running: how many stacks may run at the same time
    :param defaults: options every stack gets unless the caller gives them
    """

    def __init__(self, max_running: int = 1, **defaults: Any) -> None:
        self.max_running = max(1, max_running)
        self.defaults = defaults
        self._stacks: OrderedDict[str, AirflowStack] = OrderedDict()

    def __repr__(self) -> str:
        return f"SharedStacks({len(self._stacks)} running, max {self.max_running})"

    def get(self, *, dag_ids: Sequence[str] = (), **options: Any) -> AirflowStack:
        """
        Return a running stack with these options, starting it if needed.

        :param dag_ids: DAGs to wait for and unpause (not part of the configuration)
        :param options: :class:`AirflowStack` arguments
        """
        options = self.defaults | options
        key = _key(options)
        stack = self._stacks.get(key)
        if stack is not None:
            self._stacks.move_to_end(key)
            stack.ensure_healthy()
        else:
            while len(self._stacks) >= self.max_running:
                _, oldest = self._stacks.popitem(last=False)
                log.info("stopping %r to make room", oldest)
                oldest.stop()
            stack = AirflowStack(**options).start()
            self._stacks[key] = stack
        for dag_id in dag_ids:
            stack.wait_for_dag(dag_id)
        return stack

    __call__ = get

    @property
    def running(self) -> list[AirflowStack]:
        """The stacks started and not yet stopped, oldest use first."""
        return list(self._stacks.values())

    def stop_all(self) -> None:
        """Stop every stack."""
        while self._stacks:
            _, stack = self._stacks.popitem(last=False)
            stack.stop()
