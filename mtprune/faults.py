"""Named points where a test can make mtprune die as abruptly as a SIGKILL would.

``MTPRUNE_CRASH_AT=<point>`` in the environment kills the process at that point; nothing else
reads it. The interruption tests use it to prove that a rerun after a kill at each point completes
and produces what an uninterrupted run does.
"""

from __future__ import annotations

import os
import signal

ENV = "MTPRUNE_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
