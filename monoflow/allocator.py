r"""Keep freed CPU memory in the process, so that a training step does not map its tensors afresh.

On Linux, glibc's ``malloc`` serves every block above its mmap threshold (128 KiB, raised
dynamically up to 32 MiB) with freshly mapped pages and unmaps it when freed, and trims free memory
at the top of its heap. A CPU training step allocates the same large tensors every iteration (the
1-D models' 5000 x 513 feature buffers, image activations), so each iteration pays one page fault
per 4 KiB page on first touch, several times slower in a virtual machine. :func:`retain_freed_memory`
raises both thresholds (``mallopt(M_MMAP_THRESHOLD)`` and ``mallopt(M_TRIM_THRESHOLD)`` to 1 GiB):
freed blocks stay in the heap and the next iteration reuses them. The process then keeps its peak
memory until it exits. Values are unchanged; only time is.

The one training loop (:func:`monoflow.training.train_run`: toy, 1-D and image runs, from Python or
the ``monoflow`` command) calls it; ``MONOFLOW_RETAIN_FREED_MEMORY=0`` leaves glibc's defaults.
Elsewhere (macOS, Windows, musl) it does nothing. :func:`allocator_state` says what holds in this
process; provenance records it (``cpu_allocator``).
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

__all__ = ["retain_freed_memory", "allocator_state", "SWITCH", "THRESHOLD_BYTES"]

#: environment variable; "0" keeps glibc's defaults
SWITCH = "MONOFLOW_RETAIN_FREED_MEMORY"
#: blocks below this size come from the heap, and this much free memory may stay at its top
THRESHOLD_BYTES = 1 << 30
# mallopt's parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

_state: Optional[str] = None


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    process = ctypes.CDLL(None)  # the symbols of this process, its C library's among them
    return process if hasattr(process, "gnu_get_libc_version") and hasattr(process, "mallopt") else None


def retain_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds once per process (see the module); returns
    :func:`allocator_state`."""
    global _state
    if _state is None:
        if os.environ.get(SWITCH, "") == "0":
            _state = f"glibc defaults ({SWITCH}=0)"
        else:
            libc = _glibc()
            if libc is None:
                _state = "system defaults (not glibc)"
            elif libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD_BYTES) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD_BYTES) == 1:
                _state = "glibc, freed memory retained"
            else:
                _state = "glibc defaults (mallopt refused)"
    return _state


def allocator_state() -> str:
    """``"glibc, freed memory retained"`` once :func:`retain_freed_memory` took effect in this process,
    else why not (``"... defaults (...)"``)."""
    return _state or "system defaults (not requested)"
