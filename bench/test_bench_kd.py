"""Benchmarks of ``fastkd.kd_loss`` against the PyTorch composite (eager and torch.compile).

    python -m pytest bench/ --benchmark-only [--bench-quick] [--benchmark-json=out.json]

Each case (op, shape, dtype, device) is timed in three passes, providers back to back:

* ``fwd``: the loss alone, under ``torch.no_grad()`` (what an evaluation step runs; fastkd's
  fused kernel then skips writing the gradient, and the composites keep no graph).
* ``bwd``: ``loss.backward()`` alone; each round gets a fresh forward (with grad) in
  pytest-benchmark's untimed ``setup``.
* ``fwdbwd``: forward with grad, then ``backward()`` (a training step's loss part). After timing,
  this pass also measures peak extra memory (two ways) and compares loss and gradient with the
  float32 composite.

In every round the student's ``.grad`` is reset to None in the untimed setup, so no round pays
for accumulating into an old gradient, nor for freeing it. Memory-system probes (copy
bandwidth, the cost of first touching fresh memory) run before and after the cases, so the
traffic bound is measured in the same run as the times it is compared with.
"""

from __future__ import annotations

import gc

import pytest
import torch

import fastkd

from bench import common


def _skip_unavailable(case, provider, pass_, reason):
    common.NOTES.unavailable[f"{case.name}|{provider.name}|{pass_}"] = reason
    pytest.skip(f"{provider.name} cannot run {case.name}: {reason}")


# ----------------------------------------------------------------------------------------------
# Memory-system probes
# ----------------------------------------------------------------------------------------------


def _copy_probe(benchmark, device, budget, when):
    n = budget.copy_mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.zeros(n, dtype=torch.float32, device=device)

    def copy():
        dst.copy_(src)
        common.sync(device)

    benchmark.group = f"memory system ({device})"
    benchmark.extra_info.update(
        kind="copy", when=when, device=device, bytes_moved=2 * n * 4, buffer_bytes=n * 4,
        note="dst.copy_(src), float32, bytes read + written per call",
    )
    benchmark.pedantic(copy, rounds=budget.copy_rounds, warmup_rounds=2, iterations=1)
    del src, dst


def test_memsys_copy_start(benchmark, memsys_device, budget):
    _copy_probe(benchmark, memsys_device, budget, "start")
    if memsys_device == "cpu":
        # Validate the memory probes on this run's own shapes: one kept N x V tensor must read 1.
        seen = {}
        for case in common.QUICK_CASES if common.NOTES.quick else common.FULL_CASES:
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


# ----------------------------------------------------------------------------------------------
# The op benchmarks
# ----------------------------------------------------------------------------------------------


def test_kd(benchmark, kd_item, budget):
    case, pass_, provider = kd_item
    op = common.OPS[case.op]
    reason = provider.check(op, case)
    if reason is not None:
        _skip_unavailable(case, provider, pass_, reason)

    s, t = common.inputs(case)
    device = case.device

    def fwdbwd_once():
        s.grad = None
        fn(s, t).backward()

    try:
        fn = provider.build(op, case)
        # Warm up (and compile, for torch.compile) the exact graph this pass times; the untimed
        # call that sizes the number of rounds below warms up once more.
        for _ in range(2 if provider.name == "compile" else 1):
            if pass_ == "fwd":
                with torch.no_grad():
                    fn(s, t)
            else:
                fwdbwd_once()
        common.sync(device)
    except Exception as exc:  # noqa: BLE001 - report, do not crash the run
        msg = str(exc).strip().splitlines()
        _skip_unavailable(case, provider, pass_, f"{type(exc).__name__}: {msg[0] if msg else ''}")
    s.grad = None
    gc.collect()

    if pass_ == "fwd":

        def target():
            with torch.no_grad():
                fn(s, t)
            common.sync(device)

        setup = None
    elif pass_ == "bwd":

        def setup():
            s.grad = None
            loss = fn(s, t)
            common.sync(device)
            return (loss,), {}

        def target(loss):
            loss.backward()
            common.sync(device)

    else:

        def setup():
            s.grad = None

        def target():
            fn(s, t).backward()
            common.sync(device)

    rounds = budget.rounds(common.time_once(target, setup, device))
    s.grad = None

    benchmark.group = f"{case.name} {pass_}"
    benchmark.extra_info.update(
        kind="op",
        op=case.op,
        case=case.name,
        title=case.title,
        headline=case.headline,
        n=case.n,
        v=case.v,
        dtype=case.dtype,
        device=device,
        params=case.kwargs(),
        provider=provider.name,
        provider_title=provider.title,
        is_baseline=provider.is_baseline,
        pass_=pass_,
        unit_bytes=case.unit_bytes,
        bound_bytes=op.traffic[pass_] * case.unit_bytes,
        bound_units=op.traffic[pass_],
        grad_mode="no_grad" if pass_ == "fwd" else "enabled",
    )
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)

    if pass_ == "fwdbwd":
        # Peak extra memory of one fwd+bwd, with the inputs already allocated and no old .grad
        # (the new gradient counts: it is one of the N x V tensors the pass creates).
        # fastkd's CPU kernels keep their last gradient buffer for the next call (a fresh one costs
        # page faults); it is dropped first so that the probe counts that buffer once.
        s.grad = None
        fastkd.empty_cache()
        gc.collect()
        alloc = common.peak_alloc_bytes(lambda: fn(s, t).backward(), device)
        s.grad = None
        fastkd.empty_cache()
        result = []

        def fwdbwd_keep_loss():
            loss = fn(s, t)
            loss.backward()
            result.append(loss.detach())

        rss = common.peak_rss_bytes(fwdbwd_keep_loss) if device == "cpu" else None
        if not result:
            s.grad = None
            fwdbwd_keep_loss()
        benchmark.extra_info.update(
            peak_alloc_bytes=alloc,
            peak_alloc_units=alloc / case.unit_bytes,
            peak_rss_bytes=rss,
            peak_rss_units=None if rss is None else rss / case.unit_bytes,
            rss_note=common.rss_unavailable(),
        )
        # Sanity check of the answer (from the last call) against the float32 composite;
        # flagged in the report, asserted in tests/.
        check = common.compare(case, result[-1], s.grad)
        check["tol"] = common.CHECK_TOL.get(case.dtype, 1e-3)
        check["ok"] = all(v <= check["tol"] for k, v in check.items() if k.endswith("_err"))
        benchmark.extra_info["check"] = check
        s.grad = None


# Last in the file, so it runs after the op benchmarks: bandwidth drifts on a shared machine.
def test_memsys_copy_end(benchmark, memsys_device, budget):
    _copy_probe(benchmark, memsys_device, budget, "end")
