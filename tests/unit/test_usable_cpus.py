"""``usable_cpus()`` (service/runtime/workers.py) stays within this process's CPU affinity mask (the worker
processes themselves: tests/e2e/test_workers.py)."""

import os

from service.runtime.workers import usable_cpus


def test_usable_cpus_is_within_the_affinity_mask():
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
