"""Large allocations on transparent huge pages, set before a process has imported anything
large: the dynamic loader reads the tunable at process start only, so setting it means starting
the process again (service/entry.py does, for every `clipprune` command)."""

import os
import sys

# glibc's malloc puts the blocks it maps (every tensor-sized buffer) on transparent huge pages:
# a 270 MB model's bytes are copied a dozen times on their way through a job, and each fresh
# copy cost a page fault per 4 KiB. Measured on a 270 MB prune job: parsing 0.93 -> 0.53 s,
# pruning 3.68 -> 2.45 s, encoding 0.70 -> 0.29 s (README "Pruning at scale"). A glibc before
# 2.35 ignores it.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def with_huge_pages() -> None:
    """Start this process again with HUGE_PAGES_TUNABLE (same pid, arguments, environment
    besides), unless GLIBC_TUNABLES is already set: by this, or by an operator whose own
    setting stands. Every process the command starts (the service's workers) inherits it."""
    if "GLIBC_TUNABLES" in os.environ or not sys.platform.startswith("linux"):
        return
    environment = {**os.environ, "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
