"""Memory-system probes: copy bandwidth (the traffic bound's denominator) and what fresh pages
cost. ``conftest.py`` runs the ``start`` probes before every op benchmark and the ``end`` probe
after them all: bandwidth drifts on a shared machine, so the bound is measured in the same run as
the times it is compared with."""

from __future__ import annotations

import pytest
import torch

from . import common
from .runner import copy_probe


def test_memsys_copy_start(benchmark, memsys_device, budget):
    copy_probe(benchmark, memsys_device, budget, "start")
    if memsys_device == "cpu":
        # Validate the memory probes on this run's own shapes: one kept N x V tensor must read 1.
        seen = {}
        for case in common.SELECTED_CASES:
            key = (case.n, case.v, case.dtype)
            if key not in seen:
                seen[key] = common.memory_calibration(case.n, case.v, case.torch_dtype)
        benchmark.extra_info["memory_calibration"] = [
            {"n": n, "v": v, "dtype": d, **res} for (n, v, d), res in seen.items()
        ]
        # What fresh pages cost when torch asks for transparent huge pages (a separate process:
        # torch reads THP_MEM_ALLOC_ENABLE once).
        benchmark.extra_info["fresh_write_thp"] = common.fresh_write_probe_subprocess(
            budget.copy_mib * 2**20, budget.copy_rounds, {"THP_MEM_ALLOC_ENABLE": "1"}
        )


@pytest.mark.parametrize("fresh", [False, True], ids=["warm", "fresh"])
def test_memsys_write(benchmark, memsys_device, budget, fresh):
    """Write bandwidth into an existing buffer vs a freshly allocated one: the difference is
    what the operating system charges to fault in new pages, which every provider pays for each
    new N x V tensor it allocates (the copy probe, like the traffic bound, does not)."""
    n = budget.copy_mib * 2**20 // 4
    buf = torch.zeros(n, dtype=torch.float32, device=memsys_device)

    def write():
        if fresh:
            torch.empty(n, dtype=torch.float32, device=memsys_device).fill_(1.0)
        else:
            buf.fill_(1.0)
        common.sync(memsys_device)

    benchmark.group = f"memory system ({memsys_device})"
    benchmark.extra_info.update(
        kind="write_fresh" if fresh else "write_warm", device=memsys_device, bytes_moved=n * 4,
        note="torch.empty(n).fill_(1) per call" if fresh else "buf.fill_(1) into an existing buffer",
    )
    benchmark.pedantic(write, rounds=budget.copy_rounds, warmup_rounds=2, iterations=1)


def test_memsys_copy_end(benchmark, memsys_device, budget):
    copy_probe(benchmark, memsys_device, budget, "end")
