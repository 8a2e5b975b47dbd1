"""Peak memory of a piece of work: what one training step of a learner costs.

On CUDA the caching allocator keeps the peak itself. On the CPU nothing does, so the step runs
under ``torch.profiler`` with ``profile_memory``, whose trace records, at every allocation and
free, the total the CPU allocator holds; the peak of that total, less what was held before the
step, is the step's own peak (activations, logits, gradients), not the process's resident size.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import torch


@contextlib.contextmanager
def _quiet_stderr():
    # The profiler's C++ side (kineto) prints its start and stop, and a failed GPU probe, on
    # file descriptor 2; only its start and stop are silenced, never the work profiled.
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class Peak:
    value: float = 0.0


@contextlib.contextmanager
def peak_memory_mb(device: torch.device):
    """Context yielding a :class:`Peak` whose ``value`` is, on exit, the MiB the work inside
    allocated at its peak beyond what was allocated when it started."""
    peak = Peak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield peak
        torch.cuda.synchronize(device)
        peak.value = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        return
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.__enter__()
    try:
        yield peak
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    mem = [e["args"] for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
           if e["args"].get("Device Type") == 0]
    if mem:
        before = mem[0]["Total Allocated"] - mem[0]["Bytes"]
        peak.value = max(0, max(m["Total Allocated"] for m in mem) - before) / 2**20
