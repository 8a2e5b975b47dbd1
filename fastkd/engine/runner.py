"""A whole distillation job: checks, run directory, phases, checkpoints, final report.

Everything that can be wrong with a configuration is checked before anything is written
(:func:`prepare`): the data, module paths named by losses or stages, the output directory. A
run directory holds ``config.json`` (the resolved config and its fingerprint),
``metrics.jsonl``, ``checkpoint.pt`` (atomic; the latest), ``models/<name>.safetensors`` (final
weights), ``summary.json`` and ``report.png``.

A run stops with :class:`~fastkd.engine.trainer.Diverged` (exit status 3) when a model's loss,
gradients or weights stop being finite; its last good checkpoint stays, and ``--resume`` may
continue from it with the settings of :data:`~fastkd.engine.config.RESUMABLE` changed (a lower
``train.lr``).
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
from fastkd.engine.config import (RESUMABLE, ConfigError, changed_settings, describe_difference, fingerprint,
                                  run_identity)
from fastkd.engine.plans import plan
from fastkd.engine.report import MetricsLog, columns, plot, table
from fastkd.engine.tasks import Member, make_task
from fastkd.engine.trainer import Context, Diverged, frozen_model, run_phase

CHECKPOINT = "checkpoint.pt"


def model_path(out: str, name: str) -> str:
    """Where a run keeps a finished model's weights: ``<out>/models/<name>.safetensors``."""
    return os.path.join(out, "models", name + ckpt.MODEL_SUFFIX)


def read_run_config(out: str, resume: bool = False) -> dict:
    """``<out>/config.json`` (``{"fingerprint", "config", ...}``); with ``resume``, refused
    unless the run was written in the safe checkpoint format."""
    saved = os.path.join(out, "config.json")
    try:
        with open(saved) as f:
            old = json.load(f)
        if not isinstance(old, dict):
            raise ValueError
    except (OSError, ValueError):
        raise ConfigError(f"output directory {out} holds an unreadable config.json; choose another --out") from None
    if resume and old.get("format_version") != ckpt.FORMAT_VERSION:
        raise ckpt.CheckpointError(f"--resume: {out} predates fastkd's safe checkpoint format (its checkpoint could "
                                   "only be read by unpickling it, which can run code): start a new run instead")
    return old


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
        old = read_run_config(out, resume)
        old_cfg = old.get("config") if isinstance(old.get("config"), dict) else {}
        if old.get("fingerprint") != fingerprint(cfg) and not (resume and _identity(old_cfg) == run_identity(cfg)):
            # Where a run is written is no difference between runs.
            old_cfg, new_cfg = ({k: v for k, v in c.items() if k != "out"} for c in (old_cfg, cfg))
            if resume:
                # Name a setting that may not change, not one that may.
                kept = {k.split(".", 1)[1]: v[0] for k, v in changed_settings(old_cfg, new_cfg).items()}
                diff = describe_difference(old_cfg, {**new_cfg, "train": {**new_cfg["train"], **kept}})
                raise ConfigError(f"--resume: {out} holds a different run (differs in {diff}); a resumed run may change "
                                  f"only {', '.join(RESUMABLE)}")
            diff = describe_difference(old_cfg, new_cfg)
            raise ConfigError(f"output directory {out} holds a different run (differs in {diff}); choose another --out")
        if not resume:
            raise ConfigError(f"output directory {out} already holds this run; pass --resume to continue it or choose another --out")
    elif os.listdir(out):
        raise ConfigError(f"output directory {out} is not empty and holds no fastkd run; choose another --out")
    elif resume:
        raise ConfigError(f"--resume: {out} holds no run to resume")


def _identity(cfg: dict) -> Optional[str]:
    try:
        return run_identity(cfg)
    except (KeyError, TypeError, AttributeError):
        return None


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
        ckpt.check_format(path, state)
        missing = [k for k in ("identity", "phase", "phase_state", "store", "metrics_offset", "elapsed") if k not in state]
        if missing:
            raise ckpt.CheckpointError(f"{path} is not a complete fastkd checkpoint (no {', '.join(missing)})")
        if state["identity"] != run_identity(cfg):
            raise ConfigError(f"{path} belongs to a different run")
    external = task.external_models()
    phases, entries = plan(cfg, external=set(external), teacher_only=teacher_only)
    # What checkpoint.pt holds, for the messages: where a resumed run continues from, and where
    # one that diverges can be continued from.
    last_good = _position(state["phase"], state["phase_state"], phases) if state else None
    changes = []
    if resume and os.path.isfile(os.path.join(out, "config.json")):
        old = read_run_config(out, resume=True)
        changes = list(old.get("changes", []))
        changed = changed_settings(old["config"], cfg)
        if changed:
            changes.append({"from": last_good or "the beginning", "settings": changed})
        if main and not quiet:
            what = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            print(f"resuming {out} from " + (f"its checkpoint at {last_good}" if state else "the beginning (no checkpoint)")
                  + (f", with {what}" if what else ""), file=sys.stderr)
    if main:
        os.makedirs(os.path.join(out, "models"), exist_ok=True)
        ckpt.atomic_write_json(os.path.join(out, "config.json"), {
            "format_version": ckpt.FORMAT_VERSION, "fingerprint": fingerprint(cfg), "config": cfg,
            **({"changes": changes} if changes else {})})
    dist.barrier()

    log = MetricsLog(os.path.join(out, "metrics.jsonl") if main else None,
                     truncate_to=state["metrics_offset"] if state else 0)
    store = state["store"] if state else {}
    for name, entry in external.items():
        store.setdefault(name, entry)
    elapsed_before = state["elapsed"] if state else 0.0
    # Wall seconds of each finished phase (a phase resumed from a checkpoint counts from the resume).
    phase_seconds = dict(state.get("phase_seconds", {})) if state else {}

    def save_checkpoint(phase_index: int, phase_state: Optional[dict]) -> None:
        nonlocal last_good
        rngs = dist.all_gather_object(ckpt.rng_state())  # collective: every rank calls it
        if phase_state is not None:
            phase_state["rng"] = rngs
        if main:
            ckpt.save(path, ckpt.stamp({
                "identity": run_identity(cfg), "fingerprint": fingerprint(cfg), "phase": phase_index,
                "phase_state": phase_state, "store": store, "metrics_offset": log.offset(),
                "elapsed": elapsed_before + time.perf_counter() - t_start, "phase_seconds": phase_seconds,
            }))
        last_good = _position(phase_index, phase_state, phases)

    start = state["phase"] if state else 0
    for i in range(start, len(phases)):
        phase = phases[i]
        ctx = Context(cfg, task, splits.train, splits.val, device, store, log, lambda ps, i=i: save_checkpoint(i, ps))
        resume_state = state["phase_state"] if (state and i == start) else None
        phase_start = time.perf_counter()
        try:
            finished, costs = run_phase(ctx, i, phase, resume_state)
        except Diverged as exc:
            _explain(exc, cfg, out, path, last_good)
            raise
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
            ckpt.save_model(model_path(out, name), entry["role"], entry["state"])
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


def _position(phase_index: int, phase_state: Optional[dict], phases) -> str:
    """Where a checkpoint stands, in words."""
    if phase_state is not None:
        return f"optimizer step {phase_state['opt_steps']} of phase {phases[phase_index].name!r}"
    if phase_index < len(phases):
        return f"the start of phase {phases[phase_index].name!r}"
    return "the end of training"


def _explain(exc: Diverged, cfg: dict, out: str, path: str, last_good: Optional[str]) -> None:
    """Give ``exc`` the line the user sees: which model, when, the likely cause, what was kept
    and how to continue with a lower learning rate (``exc.reason``, ``exc.lr``, ``exc.hint``)."""
    t = cfg["train"]
    what = {"loss": f"its training loss was not finite at optimizer step {exc.step}",
            "grad": f"its gradients were not finite at optimizer step {exc.step} (norm at train.grad_clip = {t['grad_clip']:g})",
            "weights": f"its weights or optimizer state were not finite after optimizer step {exc.step}"}[exc.what]
    others = f" (so did {', '.join(exc.others)})" if exc.others else ""
    cause = f"train.lr = {t['lr']:g} is likely too high"
    if t["bf16"]:
        cause += ", or the bf16 forward overflowed (train.bf16 = true)"
    kept = (f"the last good checkpoint, {path} at {last_good}, is kept" if last_good
            else "no checkpoint was written before it, so a continued run starts over")
    exc.lr = t["lr"] / 10
    exc.reason = f"{exc.model} diverged in phase {exc.phase!r}: {what}{others}; {cause}; {kept}"
    exc.hint = f"continue with a lower learning rate: fastkd distill --resume {out} --set train.lr={exc.lr:g}"
    exc.message = f"{exc.reason}; {exc.hint}"


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
            m["reference"] = task.teacher_cache.reference
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
        summary["teacher_cache"] = task.teacher_cache.summary()
    return summary
