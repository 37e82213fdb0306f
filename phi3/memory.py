"""Resident memory while loading: give freed heap memory back to the OS."""

from __future__ import annotations

import ctypes


def return_freed_memory() -> None:
    """Hand the heap memory freed so far back to the OS. glibc keeps freed blocks in its arenas, so
    the scratch of converting one tensor after another (unpacked nibbles, old layouts) would stay
    resident: +0.4 GB after loading 8 phi-3-mini layers from a Q4_0 GGUF. A no-op where the C library
    has no `malloc_trim`."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
