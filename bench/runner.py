"""The timed body shared by every op's benchmark (``bench/test_bench_<op>.py``) and the
memory-system probes (``bench/test_bench_memsys.py``); see ``bench/common.py`` for the suite's
description and how to add an op.

Each case (op, shape, dtype, device) is timed in three passes, providers back to back:

* ``fwd``: the loss alone, under ``torch.no_grad()`` (what an evaluation step runs; fastkd's
  fused kernel then skips writing the gradient, and the composites keep no graph).
* ``bwd``: ``loss.backward()`` alone; each round gets a fresh forward (with grad) in
  pytest-benchmark's untimed ``setup``.
* ``fwdbwd``: forward with grad, then ``backward()`` (a training step's loss part). After timing,
  this pass also measures peak extra memory (two ways) and compares loss and gradient with the
  float32 composite.

In every round the student's ``.grad`` is reset to None in the untimed setup, so no round pays
for accumulating into an old gradient, nor for freeing it.
"""

from __future__ import annotations

import gc

import pytest
import torch

import fastkd

from . import common


def skip_unavailable(case, provider, pass_, reason):
    common.NOTES.unavailable[f"{case.name}|{provider.name}|{pass_}"] = reason
    pytest.skip(f"{provider.name} cannot run {case.name}: {reason}")


def skip_failed(case, provider, pass_, reason):
    """The provider can run such a case (its check passed) but raised on this one: reported as
    failed, with its one-line reason, and the run goes on."""
    common.NOTES.failed[f"{case.name}|{provider.name}|{pass_}"] = reason
    pytest.skip(f"{provider.name} failed on {case.name}: {reason}")


def copy_probe(benchmark, device, budget, when):
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


def run_case(benchmark, item, budget):
    """Times one (case, pass, provider) item; the body of every op's ``test_<op>``."""
    case, pass_, provider = item
    op = common.OPS[case.op]
    reason = provider.check(op, case)
    if reason is not None:
        skip_unavailable(case, provider, pass_, reason)

    xs = common.inputs(case)
    s = xs[0]
    leaves = [x for x in xs if x.requires_grad]

    def clear_grads():
        for x in leaves:
            x.grad = None
    device = case.device

    def fwdbwd_once():
        clear_grads()
        fn(*xs).backward()

    try:
        fn = provider.build(op, case)
        common.injected_failure(provider, case)  # a test-only hook; nothing unless its variable is set
        # Warm up (and compile, for torch.compile) the exact graph this pass times; the untimed
        # call that sizes the number of rounds below warms up once more.
        for _ in range(2 if provider.name == "compile" else 1):
            if pass_ == "fwd":
                with torch.no_grad():
                    fn(*xs)
            else:
                fwdbwd_once()
        common.sync(device)
    except Exception as exc:  # noqa: BLE001 - report, do not crash the run
        msg = str(exc).strip().splitlines()
        skip_failed(case, provider, pass_, f"{type(exc).__name__}: {msg[0] if msg else ''}")
    clear_grads()
    gc.collect()

    if pass_ == "fwd":

        def target():
            with torch.no_grad():
                fn(*xs)
            common.sync(device)

        setup = None
    elif pass_ == "bwd":

        def setup():
            clear_grads()
            loss = fn(*xs)
            common.sync(device)
            return (loss,), {}

        def target(loss):
            loss.backward()
            common.sync(device)

    else:

        def setup():
            clear_grads()

        def target():
            fn(*xs).backward()
            common.sync(device)

    rounds = budget.rounds(common.time_once(target, setup, device))
    clear_grads()

    traffic = op.traffic(case)
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
        bound_bytes=traffic[pass_] * case.unit_bytes,
        bound_units=traffic[pass_],
        traffic_note=op.traffic_note,
        composite_text=op.composite_text,
        targets=[list(t) for t in case.targets],
        grad_mode="no_grad" if pass_ == "fwd" else "enabled",
    )
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)

    if pass_ == "fwdbwd":
        # Peak extra memory of one fwd+bwd, with the inputs already allocated and no old .grad
        # (the new gradient counts: it is one of the N x V tensors the pass creates).
        # fastkd's CPU kernels keep their last gradient buffer for the next call (a fresh one costs
        # page faults); it is dropped first so that the probe counts that buffer once.
        clear_grads()
        fastkd.empty_cache()
        gc.collect()
        alloc = common.peak_alloc_bytes(lambda: fn(*xs).backward(), device)
        clear_grads()
        fastkd.empty_cache()
        result = []

        def fwdbwd_keep_loss():
            loss = fn(*xs)
            loss.backward()
            result.append(loss.detach())

        rss = common.peak_rss_bytes(fwdbwd_keep_loss) if device == "cpu" else None
        if not result:
            clear_grads()
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
        if provider.is_bound:
            check = {"skipped": "a time bound: it computes no loss", "ok": True}
        else:
            check = common.compare(case, result[-1], s.grad)
            check["tol"] = common.CHECK_TOL.get(case.dtype, 1e-3)
            check["ok"] = all(v <= check["tol"] for k, v in check.items() if k.endswith("_err"))
            if not check["ok"]:
                check = common.arbitrate(case, result[-1], s.grad, check)
        benchmark.extra_info["check"] = check
        clear_grads()


