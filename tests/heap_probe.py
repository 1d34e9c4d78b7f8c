"""Count the page faults of a freed-and-reallocated 64 MB block in a fresh Python process.

glibc serves blocks over 32 MB with fresh mmap pages and unmaps them on free, so without
``hold_freed_memory`` each allocation faults in all its 16k pages again; with it, the heap
reuses the block. The setting lasts for the process, hence a process per check.
"""
import subprocess
import sys

_PROBE = """
import resource, sys, torch
if sys.argv[1] == "held":
    from fractalad.train import hold_freed_memory
    assert hold_freed_memory()
elif sys.argv[1] in ("load_run", "load_run_unheld"):  # what test / predict / calibrate do first
    from fractalad.evaluate import load_run
    load_run(sys.argv[2], "cpu", hold_memory=sys.argv[1] == "load_run")
for _ in range(4):  # 64 MB, above glibc's largest mmap threshold: a step's activation
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 << 20)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del x
print(faults)  # the last round's: by then a held heap has the block to reuse
"""


def refault_count(mode: str, *args: str) -> int:
    """Page faults of the fourth 64 MB allocation after ``mode``: 'default', 'held', 'load_run RUN'
    or 'load_run_unheld RUN' (``hold_memory=False``)."""
    return int(subprocess.run([sys.executable, "-c", _PROBE, mode, *args], check=True,
                              capture_output=True, text=True).stdout)
