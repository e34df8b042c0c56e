"""What every runtime worker shares: read the JSON job named on the command line, print the row as the last line of
stdout, time a call. Imported by the workers as a sibling module (a script's own directory is on ``sys.path``), so
it too imports nothing but the standard library."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any


def serve(main: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    with open(sys.argv[1]) as f:
        row = main(json.load(f))
    print(json.dumps(row))


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
