"""What a test may leave behind: open file descriptors and threads, as the leak checks see them."""

from __future__ import annotations

import os
import re
import sys
import threading
from typing import Final

#: The names anyio and trio give their worker threads (idle ones live on for a while).
IDLE_THREAD_NAME: Final = re.compile(r"AnyIO worker thread|Trio thread \d+")


def fd_targets() -> dict[int, str]:
    """This process's open file descriptors and what each refers to."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the descriptor listdir itself used
    return out


def is_idle_worker(thread: threading.Thread) -> bool:
    """A named worker thread of anyio or trio, idle: no ocicas frame on its stack."""
    if not IDLE_THREAD_NAME.fullmatch(thread.name) or thread.ident is None:
        return False
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if f"{os.sep}ocicas{os.sep}" in frame.f_code.co_filename:
            return False
        frame = frame.f_back
    return True
