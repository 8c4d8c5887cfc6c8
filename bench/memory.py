"""Peak memory of a CPU benchmark, from the kernel's own accounting (``/proc/self/status``), so
every allocation counts, on any allocator path (Linux only).

``reset_peak()`` sets the resident high-water mark (VmHWM) back to the current resident set
(VmRSS); ``peak_mib()`` reads it. On a GPU the benchmarks read torch's peak allocated memory.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"


def rss_kib(field: str) -> int:
    """A memory field of this process in KiB, e.g. ``"VmRSS:"`` (resident now) or ``"VmHWM:"``
    (resident high-water mark).

    Raises:
        ValueError: ``field`` is not in ``/proc/self/status``.
    """
    with open(STATUS) as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise ValueError(f"field {field!r} is not in {STATUS} (expected e.g. 'VmRSS:' or 'VmHWM:')")


def reset_peak() -> None:
    """Set the high-water mark back to the current resident set: the next ``peak_mib`` counts
    only what runs after this call."""
    with open(CLEAR_REFS, "w") as f:
        f.write("5")


def peak_mib() -> float:
    """The process's resident high-water mark (MiB) since it started or since ``reset_peak``."""
    return rss_kib("VmHWM:") / 1024


def peak_increase_mib(fn: Callable[[], object]) -> float:
    """Peak resident-set increase (MiB) while ``fn`` runs: freed memory is first handed back to
    the system (``malloc_trim``) so that ``fn`` cannot reuse it unseen."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_peak()
    before = rss_kib("VmRSS:")
    result = fn()
    peak = rss_kib("VmHWM:")
    del result
    return (peak - before) / 1024
