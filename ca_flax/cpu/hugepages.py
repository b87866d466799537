"""Transparent huge pages for a process's large allocations (Linux with glibc >= 2.35).

XLA:CPU takes its temporaries from malloc: a CPU training step of these networks walks
gigabytes of them, which in 4 KiB pages misses the TLB all the time. With the glibc tunable
`glibc.malloc.hugetlb=1`, malloc asks the kernel for 2 MiB pages (madvise) instead, and far
fewer pages cover the same memory (docs/cpu_backend.md#huge-pages). glibc reads tunables only
at start-up, so the command-line entry points re-execute themselves once with it set.
`CA_FLAX_NO_HUGE_PAGES=1` opts out.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "CA_FLAX_NO_HUGE_PAGES"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def supported() -> bool:
    """Linux, glibc >= 2.35 (the tunable's first release), and the kernel's THP not 'never'."""
    if sys.platform != "linux":
        return False
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
        return False
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def tunables() -> list[str]:
    """This process's GLIBC_TUNABLES entries, as `name=value` strings."""
    return [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]


def enabled() -> bool:
    """Whether this process started with glibc's malloc asking for huge pages."""
    return TUNABLE in tunables()


def reexec_with_huge_pages() -> None:
    """Re-execute the running command with `glibc.malloc.hugetlb=1` added to GLIBC_TUNABLES,
    unless the user set `glibc.malloc.hugetlb` already, it is unsupported here, or opted out
    of. Call first in a CLI's `__main__`; it does not return when it re-executes."""
    name = TUNABLE.split("=")[0]
    user_chose = any(t.split("=")[0] == name for t in tunables())
    if user_chose or os.environ.get(OPT_OUT) or not supported():
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join([*tunables(), TUNABLE]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
