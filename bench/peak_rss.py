"""Peak memory of a benchmark's child process, read so that the parent's size does not leak in."""

from __future__ import annotations

from pathlib import Path


def peak_rss_kib() -> int:
    """Peak resident set of this process image in KiB (``VmHWM`` of ``/proc/self/status``).

    Not ``getrusage``'s ``ru_maxrss``: Linux carries it over ``exec`` from the forked parent, so
    a fresh child of a large benchmark process reports at least the parent's size.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmHWM line (Linux only)")
