"""How one Preprocess replica keeps its memory bounded: a budget of pixels decoded at once, and freed memory
handed back to the system.

Sync deployment methods run in Serve's thread pool, so a replica decodes up to ``max_ongoing_requests`` images at
once; sixteen 40 Mpx PNGs at once took one replica past 4 GB. Each decode first takes its image's pixels from a
:class:`PixelBudget` (one decode always runs, however large). Freed buffers stay in glibc's per-thread arenas
unless trimmed, which kept a replica at 4 GB after such a burst; :func:`release_memory` trims them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading
from typing import Iterator

_LIBC = None


class PixelBudget:
    """Admits work by its pixel count while the pixels in flight stay within ``pixels``; one item is always
    admitted, so an image larger than the budget waits only for the others."""

    def __init__(self, pixels: int):
        self.pixels, self.in_flight, self.running = pixels, 0, 0
        self.changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self.changed:
            self.changed.wait_for(lambda: self.running == 0 or self.in_flight + pixels <= self.pixels)
            self.in_flight += pixels
            self.running += 1
        try:
            yield
        finally:
            with self.changed:
                self.in_flight -= pixels
                self.running -= 1
                self.changed.notify_all()


def header_pixels(data: bytes, max_pixels: int) -> int:
    """Pixels of the image in ``data`` by its header (0 when it cannot be read: preprocessing then refuses it)."""
    from dynrefer.imageio import ImageError, probe_size

    try:
        width, height = probe_size(data, max_pixels)
    except ImageError:
        return 0
    return width * height


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``); nothing elsewhere."""
    global _LIBC
    if _LIBC is None:
        path = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(path) if path else False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
