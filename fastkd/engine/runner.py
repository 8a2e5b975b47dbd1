"""A whole distillation job: checks, run directory, phases, checkpoints, final report.

Everything that can be wrong with a configuration is checked before anything is written
(:func:`prepare`): the data, module paths named by losses or stages, the output directory. A
run directory holds ``config.json`` (the resolved config and its fingerprint),
``metrics.jsonl``, ``checkpoint.pt`` (atomic; the latest), ``models/<name>.pt`` (final weights),
``summary.json`` and ``report.png``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import torch

from fastkd.engine import checkpoint as ckpt
from fastkd.engine import distributed as dist
from fastkd.engine.config import ConfigError, describe_difference, fingerprint
from fastkd.engine.plans import plan
from fastkd.engine.report import MetricsLog, columns, plot, table
from fastkd.engine.tasks import Member, make_task
from fastkd.engine.trainer import Context, frozen_model, run_phase

CHECKPOINT = "checkpoint.pt"


def default_out(cfg: dict) -> str:
    return os.path.join("runs", f"{cfg['name']}-{time.strftime('%Y%m%d-%H%M%S')}")


def check_out_dir(out: str, cfg: dict, resume: bool) -> None:
    """Refuse to touch a directory that holds something else than this run."""
    saved = os.path.join(out, "config.json")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"output path {out} exists and is not a directory")
    if not os.path.isdir(out):
        if resume:
            raise ConfigError(f"--resume: run directory {out} does not exist")
        return
    if os.path.isfile(saved):
        try:
            with open(saved) as f:
                old = json.load(f)
        except (OSError, ValueError):
            raise ConfigError(f"output directory {out} holds an unreadable config.json; choose another --out") from None
        if old.get("fingerprint") != fingerprint(cfg):
            diff = describe_difference(old.get("config", {}), {k: v for k, v in cfg.items()})
            raise ConfigError(f"output directory {out} holds a different run (differs in {diff}); choose another --out")
        if not resume:
            raise ConfigError(f"output directory {out} already holds this run; pass --resume to continue it or choose another --out")
    elif os.listdir(out):
        raise ConfigError(f"output directory {out} is not empty and holds no fastkd run; choose another --out")
    elif resume:
        raise ConfigError(f"--resume: {out} holds no run to resume")


def _device(cfg: dict) -> torch.device:
    want = cfg["train"]["device"]
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device = 'cuda' but no CUDA device is available")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def prepare(cfg: dict, resume: bool = False):
    """All checks that need no training: data, models and module paths (the task's), output
    directory. Returns ``(task, splits, out_dir, device)``; raises :class:`ConfigError` before
    anything is written."""
    device = _device(cfg)
    task = make_task(cfg).to(device)
    splits = task.load()
    task.check(splits)
    out = cfg["out"] or default_out(cfg)
    check_out_dir(out, {**cfg, "out": out}, resume)
    return task, splits, out, device


def run_job(cfg: dict, resume: bool = False, quiet: bool = False, teacher_only: bool = False) -> dict:
    """Run (or continue, with ``resume``) the job described by a validated config.

    Returns the summary (also written to ``<out>/summary.json``); prints the table on rank 0
    unless ``quiet``. ``teacher_only`` runs the teachers' phase alone (the summary reports the
    teacher).
    """
    t_start = time.perf_counter()
    device = _device(cfg)
    dist.init(device)
    try:
        task, splits, out, device = prepare(cfg, resume)
        cfg = {**cfg, "out": out}
        task.cfg = cfg
        dist.barrier()  # every rank has checked the directory before rank 0 creates it
        try:
            return _run(cfg, task, splits, out, device, resume, quiet, t_start, teacher_only)
        except KeyboardInterrupt as exc:
            raise Interrupted(out) from exc
    finally:
        dist.shutdown()


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``out`` is the run directory, whose last checkpoint ``--resume``
    continues from."""

    def __init__(self, out: str):
        super().__init__(out)
        self.out = out


def _run(cfg, task, splits, out, device, resume, quiet, t_start, teacher_only=False) -> dict:
    # Process-wide torch settings are restored afterwards: a job may run inside a larger program.
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    t = cfg["train"]
    if t["threads"]:
        torch.set_num_threads(t["threads"])
    if t["deterministic"] and device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    try:
        return _run_phases(cfg, task, splits, out, device, resume, quiet, t_start, teacher_only)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _run_phases(cfg, task, splits, out, device, resume, quiet, t_start, teacher_only=False) -> dict:
    main = dist.is_main()
    t = cfg["train"]
    state = None
    path = os.path.join(out, CHECKPOINT)
    if resume and os.path.isfile(path):
        state = ckpt.load(path)
        if state.get("fingerprint") != fingerprint(cfg):
            raise ConfigError(f"{path} belongs to a different run")
    if main:
        os.makedirs(os.path.join(out, "models"), exist_ok=True)
        ckpt.atomic_write_json(os.path.join(out, "config.json"), {"fingerprint": fingerprint(cfg), "config": cfg})
    dist.barrier()

    log = MetricsLog(os.path.join(out, "metrics.jsonl") if main else None,
                     truncate_to=state["metrics_offset"] if state else 0)
    store = state["store"] if state else {}
    external = task.external_models()
    for name, entry in external.items():
        store.setdefault(name, entry)
    elapsed_before = state["elapsed"] if state else 0.0
    # Wall seconds of each finished phase (a phase resumed from a checkpoint counts from the resume).
    phase_seconds = dict(state.get("phase_seconds", {})) if state else {}
    phases, entries = plan(cfg, external=set(external), teacher_only=teacher_only)

    def save_checkpoint(phase_index: int, phase_state: Optional[dict]) -> None:
        rngs = dist.all_gather_object(ckpt.rng_state())  # collective: every rank calls it
        if phase_state is not None:
            phase_state["rng"] = rngs
        if main:
            ckpt.save(path, {
                "fingerprint": fingerprint(cfg), "phase": phase_index, "phase_state": phase_state, "store": store,
                "metrics_offset": log.offset(), "elapsed": elapsed_before + time.perf_counter() - t_start,
                "phase_seconds": phase_seconds,
            })

    start = state["phase"] if state else 0
    for i in range(start, len(phases)):
        phase = phases[i]
        ctx = Context(cfg, task, splits.train, splits.val, device, store, log, lambda ps, i=i: save_checkpoint(i, ps))
        resume_state = state["phase_state"] if (state and i == start) else None
        phase_start = time.perf_counter()
        finished, costs = run_phase(ctx, i, phase, resume_state)
        phase_seconds[phase.name] = round(time.perf_counter() - phase_start, 2)
        for spec in phase.learners:
            store[spec.name] = {"role": spec.role, "state": {k: v.cpu() for k, v in finished[spec.name].state_dict().items()},
                                "cost": costs[spec.name]}
        save_checkpoint(i + 1, None)

    summary = evaluate(cfg, task, splits, store, entries, device, log)
    summary["phase_wall_s"] = phase_seconds
    summary["wall_time_s"] = round(elapsed_before + time.perf_counter() - t_start, 2)
    log.close()
    if main:
        for name, entry in store.items():
            if entry["state"] is None:
                continue  # not trained here (the teacher a cache was written with)
            ckpt.save(os.path.join(out, "models", f"{name}.pt"), {"role": entry["role"], "state": entry["state"]})
        ckpt.atomic_write_json(os.path.join(out, "summary.json"), summary)
        if t["plot"]:
            tmp = os.path.join(out, ".report.tmp.png")
            plot(os.path.join(out, "metrics.jsonl"), summary, tmp)
            os.replace(tmp, os.path.join(out, "report.png"))
        if not quiet:
            print(table(summary["models"], columns(summary)))
            print(f"run directory: {out} (summary.json, metrics.jsonl, report.png, models/)  "
                  f"wall time {summary['wall_time_s']:.1f} s")
            sys.stdout.flush()
    return summary


def evaluate(cfg, task, splits, store, entries, device, log) -> dict:
    """Test-split metrics of every summary entry (an entry of several models is their
    probability-averaged ensemble), measured by the task, with what training a single model
    cost; each is also logged as a ``split: test`` line."""
    from fastkd.engine import compress

    ctx = Context(cfg, task, splits.train, splits.val, device, store, log, lambda ps: None)
    cache: dict = {}

    def members(names):
        return [Member(n, lambda n=n: frozen_model(ctx, n)) for n in names]

    models, training = {}, {}
    for e in entries:
        m = task.evaluate(splits.test, members(e.models), members(e.reference) if e.reference else None, cache)
        if len(e.models) == 1:
            name = e.models[0]
            if store[name]["role"] == "student" and cfg["student"]["prune_amount"] > 0:
                m["sparsity"] = compress.sparsity(frozen_model(ctx, name))
            elif store[name]["role"] == "student" and cfg["student"]["quant_bits"] > 0:
                m["quant_levels"] = compress.quant_levels(frozen_model(ctx, name))
            cost = store[name].get("cost") or {}
            if cost.get("seconds"):
                # Kept apart from the metrics: timings differ between identical runs.
                training[e.name] = {f"{task.UNIT}_per_s": round(cost["units"] / cost["seconds"], 1),
                                    "step_peak_mb": cost.get("peak_mb")}
        if e.reference:
            m["reference"] = "+".join(e.reference) if len(e.reference) < 3 else f"ensemble of {len(e.reference)}"
        elif task.teacher_cache is not None and len(e.models) == 1 and store[e.models[0]]["role"] == "student":
            # No teacher at hand to measure against: the cached one, on the split it covers.
            m.update(task.cache_fidelity(frozen_model(ctx, e.models[0])))
            m["reference"] = task.cache_reference
        models[e.name] = m
        log({"phase": "final", "model": e.name, "split": "test", **{k: v for k, v in m.items() if k != "reference"}})
    summary = {
        "method": cfg["method"],
        "task": task.NAME,
        "seed": cfg["seed"],
        "data": task.describe(splits),
        "fingerprint": fingerprint(cfg),
        "models": models,
        "training": training,
    }
    if task.teacher_cache is not None:
        summary["teacher_cache"] = task.describe_cache()
    return summary
