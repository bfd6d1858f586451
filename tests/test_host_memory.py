"""engine/host_memory.py: after `retain_freed_memory`, the pages of freed large tensors are reused by the next
step instead of being mapped and zero-filled anew. Counted with the kernel's minor page faults, in a fresh process
(the setting is process-wide)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.host_memory import is_glibc, retain_freed_memory

STEP_MIB = (48, 40, 36)  # one "step": three temporaries, each above glibc's 32 MiB adaptive mmap ceiling
PROBE = f"""
import json, resource, sys
import torch
from engine.host_memory import retain_freed_memory
retained = retain_freed_memory() if sys.argv[1] == "retain" else False
faults, resident_mib = [], []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(mib << 18) for mib in {STEP_MIB}]  # allocated and touched
    del tensors
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    resident_mib.append(int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20)
print(json.dumps({{"retained": retained, "faults": faults, "resident_mib": resident_mib}}))
"""
STEP_PAGES = sum(STEP_MIB) * 256  # 4 KiB pages

GLIBC = is_glibc()


def probe(mode: str) -> dict:
    output = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])  # the repository root: `engine` imports
    return json.loads(output.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_retained_memory_is_reused_without_page_faults():
    default, retained = probe("default"), probe("retain")
    assert default["retained"] is False and retained["retained"] is True
    # glibc's defaults map every such tensor afresh: each step faults all its pages in again
    assert min(default["faults"]) >= 0.9 * STEP_PAGES
    # retained: after a few steps (freed blocks coalesce until a step fits) no step faults any more...
    assert retained["faults"][0] >= 0.9 * STEP_PAGES and max(retained["faults"][-4:]) < 0.01 * STEP_PAGES
    # ...and the heap kept for reuse stays bounded (a few steps' worth), it does not grow step after step
    growth = retained["resident_mib"][-1] - retained["resident_mib"][0]
    assert growth <= 3 * sum(STEP_MIB) and abs(retained["resident_mib"][-1] - retained["resident_mib"][-4]) <= 2


@pytest.mark.skipif(GLIBC, reason="outside glibc")
def test_retain_does_nothing_outside_glibc():
    assert retain_freed_memory() is False
