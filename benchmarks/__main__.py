"""
``python -m benchmarks [batch|triggerer|scale|latency|micro|callbacks] ...``: figures, printed, not asserted.

* ``batch`` (default; ``make bench N=200 LATENCY=60``): the batch DAG on the real stack, three
  ways side by side, against the physical bound;
* ``triggerer`` (``make bench-triggerer``): 1,000 waiting images on one triggerer;
* ``scale`` (``make bench-scale``): 2,000 prompts at a high rate limit, and a 10,000-prompt file;
* ``latency``: completion-to-resume delay per image, callback mode against polling;
* ``micro``: the trigger alone, in one process;
* ``callbacks``: the callback receiver under a loopback load.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "batch": "benchmarks.batch",
    "triggerer": "benchmarks.triggerer",
    "scale": "benchmarks.scale",
    "latency": "benchmarks.latency",
    "micro": "benchmarks.micro",
    "callbacks": "benchmarks.callbacks_load",
}


def main() -> None:
    args = sys.argv[1:]
    command = args.pop(0) if args and args[0] in COMMANDS else "batch"
    sys.argv = [f"python -m benchmarks {command}", *args]
    importlib.import_module(COMMANDS[command]).main()


if __name__ == "__main__":
    main()
