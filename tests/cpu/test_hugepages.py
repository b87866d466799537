"""Huge pages for the CLIs: the re-execution keeps the command and really gets 2 MiB pages."""

import json
import os
import subprocess
import sys

import pytest

from ca_flax.cpu import hugepages

# Re-executes (as train.py and the bench do), then reports what the process ended up with
# after filling a 64 MiB malloc block (as XLA's temporaries are; numpy madvises on its own):
# its argv, tunables, and anonymous huge-page memory.
PROBE = """
import ctypes, json, re, sys
from ca_flax.cpu import hugepages
hugepages.reexec_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(64 << 20)
ctypes.memset(block, 1, 64 << 20)
smaps = open("/proc/self/smaps_rollup").read()
huge_kb = int(re.search(r"AnonHugePages:\\s+(\\d+) kB", smaps).group(1))
print(json.dumps({"argv": sys.argv[1:], "tunables": hugepages.tunables(), "huge_kb": huge_kb}))
"""


def probe(**env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "--flag", "value"],
        env=base | env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


needs_thp = pytest.mark.skipif(not hugepages.supported(), reason="no glibc >= 2.35 THP here")


@needs_thp
def test_reexecution_keeps_the_command_and_gets_huge_pages():
    got = probe()
    assert got["argv"] == ["--flag", "value"]
    assert hugepages.TUNABLE in got["tunables"]
    assert got["huge_kb"] >= 32 << 10  # most of the 64 MiB block sits in 2 MiB pages
    assert probe(**{hugepages.OPT_OUT: "1"})["huge_kb"] < 32 << 10  # and without: not


@needs_thp
def test_existing_tunables_are_kept_and_a_users_choice_wins():
    kept = probe(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")["tunables"]
    assert kept == ["glibc.malloc.trim_threshold=1000000", hugepages.TUNABLE]
    assert probe(GLIBC_TUNABLES="glibc.malloc.hugetlb=0")["tunables"] == ["glibc.malloc.hugetlb=0"]


def test_opting_out_runs_the_command_as_it_is():
    assert probe(**{hugepages.OPT_OUT: "1"})["tunables"] == []
