"""``fastkd cache-teacher``: run a language-model job's teacher once over its training split and
write its top-K (or K samples) per token as a teacher cache (:mod:`fastkd.teacher_cache`), which
``fastkd distill --teacher-cache DIR`` then distils from without the teacher.

``fastkd cache-teacher [CONFIG.toml] --data lm (--top-k K | --sample K) [--values logprobs|logits]
[--value-dtype bfloat16|float16] [--out DIR] [--teacher-out DIR] [--resume] [--set KEY=VALUE ...]``

The teacher is the job's: loaded from ``teacher.path`` (a ``from_pretrained`` directory, used as
it is, or a model file such as a fastkd run's ``runs/<run>/models/teacher_0.safetensors`` or a
``.pt`` state dict, read without unpickling anything but tensors, whose weights must fit the
job's ``[teacher]`` table and are kept as ``<teacher-out>/teacher``), or else trained
exactly as ``fastkd distill`` trains it (the same seed, batches and
epochs, so the same weights), in a run directory of its own (``--teacher-out``, default
``<out>-teacher``) that also keeps it as a ``from_pretrained`` directory, ``teacher/``. That
happens before the first shard is written, and the manifest names the directory: ``--resume``
reuses the teacher instead of training it again (or continues its training, if that was what
was interrupted), and a student distilled from the cache is measured against it.

Row ``t`` of the cache is the teacher's next-token distribution at position ``t % (C − 1)`` of
training window ``t // (C − 1)`` (windows of C tokens; the last position of a window predicts
nothing), so a student's rows of window ``w`` are cache rows ``[w·(C−1), (w+1)·(C−1))``. Windows
go through the teacher in fixed groups of ``--batch-windows`` from the first, so a resumed write
computes exactly the rows a write in one go would.

A teacher whose training diverges, or whose logits are not finite on some window, stops the
command with one line and exit status 3 before a shard holding such rows is written.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import time

import torch

from fastkd.engine.schema import ConfigError

EXAMPLE = "fastkd cache-teacher --data lm --top-k 32"


class CacheInterrupted(KeyboardInterrupt):
    """Ctrl-C while caching; ``hint`` says how to continue."""

    def __init__(self, hint: str):
        super().__init__(hint)
        self.hint = hint


def add_parser(sub) -> None:
    c = sub.add_parser("cache-teacher", help="write a language-model teacher's top-k per token once, for distill --teacher-cache")
    c.add_argument("config", nargs="?", help="TOML config of the job (default: with --data lm, the language-model job)")
    c.add_argument("--data", help="lm (the language-model job), as for distill")
    how = c.add_mutually_exclusive_group()
    how.add_argument("--top-k", type=int, metavar="K", help="keep each token's K most probable entries")
    how.add_argument("--sample", type=int, metavar="K",
                     help="keep K draws from each token's distribution (Sparse Logit Sampling: unbiased at temperature 1)")
    c.add_argument("--values", choices=("logprobs", "logits"), default="logprobs",
                   help="store log-probabilities at temperature 1 (default) or raw logits (top-k only)")
    c.add_argument("--value-dtype", choices=("bfloat16", "float16"),
                   help="2-byte float of the values (default: bfloat16 for top-k, float16 for samples, whose log-frequencies lie in [-log K, 0])")
    c.add_argument("--out", help="cache directory (default: caches/<name>-top<K> or -sample<K>)")
    c.add_argument("--teacher-out", help="run directory of the teacher it trains (default: <out>-teacher)")
    c.add_argument("--resume", action="store_true", help="continue an interrupted cache (and the teacher's training)")
    c.add_argument("--shard-tokens", type=int, default=1 << 16, help="tokens per shard (default 65536)")
    c.add_argument("--batch-windows", type=int, default=16, help="windows per teacher forward (default 16)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key, as for distill")


def _config(args) -> dict:
    from fastkd.engine.config import LM_JOB, load_config, parse_overrides

    overrides = parse_overrides(args.set)
    if args.data is not None:
        overrides.append(("data.name", args.data))
    if args.no_progress:
        overrides.append(("train.progress", False))
    base = copy.deepcopy(LM_JOB) if args.data == "lm" and args.config is None else None
    cfg = load_config(args.config, overrides, base=base)
    if cfg["data"]["name"] != "lm":
        raise ConfigError(f"cache-teacher caches a language model's teacher: pass --data lm or a config with data.name = 'lm' "
                          f"(this job's data.name is {cfg['data']['name']!r}); e.g. {EXAMPLE}")
    if cfg["teacher"]["cache"]:
        raise ConfigError("teacher.cache names a cache to read; cache-teacher writes one (name it with --out)")
    return cfg


def _check_args(args) -> tuple:
    k = args.top_k if args.top_k is not None else args.sample
    if k is None:
        raise ConfigError(f"say how many entries per token to keep: --top-k K or --sample K (e.g. {EXAMPLE})")
    if k < 1:
        raise ConfigError(f"--{'top-k' if args.top_k is not None else 'sample'} must be at least 1, got {k}")
    if args.sample is not None and args.values != "logprobs":
        raise ConfigError("--sample stores the draws' frequencies as log-probabilities: --values logits does not apply")
    for flag, value in (("--shard-tokens", args.shard_tokens), ("--batch-windows", args.batch_windows)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    selection = "top_k" if args.top_k is not None else "sample"
    dtype = args.value_dtype or ("bfloat16" if selection == "top_k" else "float16")
    return k, selection, dtype


def _save_pretrained_atomic(model, directory: str) -> None:
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def _teacher(cfg: dict, task, out: str, teacher_out: str, manifest_info: dict, quiet: bool):
    """The teacher model (eval mode) and what the manifest records of it: loaded from
    ``teacher.path``, from the directory a resumed cache names, or trained in ``teacher_out``."""
    from fastkd import teacher_cache as tc
    from fastkd.engine import checkpoint as ckpt
    from fastkd.engine.runner import Interrupted, check_out_dir, model_path, run_job
    from fastkd.engine.trainer import Diverged

    named = (manifest_info.get("teacher") or {}).get("dir")
    checkpoint = getattr(task, "teacher_checkpoint", None)
    if checkpoint:
        # A model file of a fastkd run: its weights in the job's [teacher] architecture, kept as
        # a from_pretrained directory beside the cache, which a student run can load to measure.
        model = task.build("teacher", seed=0)
        try:
            _, state = ckpt.load_model(checkpoint)
        except ckpt.CheckpointError as exc:
            raise ConfigError(f"teacher.path: {exc}") from None
        try:
            model.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001 - other names or shapes: one line either way
            raise ConfigError(f"teacher.path {checkpoint}: not weights of the job's [teacher] model "
                              f"({str(exc).strip().splitlines()[0]})") from None
        pretrained = os.path.join(teacher_out, "teacher")
        os.makedirs(teacher_out, exist_ok=True)
        _save_pretrained_atomic(model, pretrained)
        where, info = pretrained, {"checkpoint": os.path.abspath(checkpoint), "dir": os.path.abspath(pretrained)}
    elif cfg["teacher"]["path"]:
        where, info = cfg["teacher"]["path"], {"dir": os.path.abspath(cfg["teacher"]["path"])}
    elif named:
        if not os.path.isfile(os.path.join(named, "config.json")):
            raise ConfigError(f"{out} was begun with the teacher in {named}, which is gone: write a new cache (another --out)")
        where, info = named, dict(manifest_info["teacher"])
    else:
        run_dir = teacher_out
        pretrained = os.path.join(run_dir, "teacher")
        tcfg = {**cfg, "name": f"{cfg['name']}-teacher", "out": run_dir}
        resume = os.path.isfile(os.path.join(run_dir, "config.json"))
        check_out_dir(run_dir, tcfg, resume=resume)  # a run directory of another job is refused
        if not os.path.isfile(os.path.join(pretrained, "config.json")):
            if not quiet:
                print(f"training the teacher in {run_dir}" + (" (resumed)" if resume else ""), file=sys.stderr)
            try:
                run_job(tcfg, resume=resume, quiet=quiet, teacher_only=True)
            except Interrupted:
                raise CacheInterrupted("the teacher's training stopped; continue it and the cache with --resume") from None
            except Diverged as exc:
                exc.message = (f"{exc.reason}; continue with a lower learning rate: fastkd cache-teacher ... --out {out} "
                               f"--resume --set train.lr={exc.lr:g}")
                raise
            model = task.build("teacher", seed=0)
            model.load_state_dict(ckpt.load_model(model_path(run_dir, "teacher_0"))[1])
            _save_pretrained_atomic(model, pretrained)
        where, info = pretrained, {"run": os.path.abspath(run_dir), "dir": os.path.abspath(pretrained)}
    # Read back from the directory even when just saved there: the fingerprint the manifest
    # records is then of the weights a student run will load to measure against.
    try:
        model = task.build("teacher", 0, path=where)
    except (ValueError, LookupError) as exc:
        raise ConfigError(f"teacher: {exc}") from None
    model.to(task.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, info, tc.state_fingerprint(model)


def _not_finite(row: int, w0: int, per: int, teacher_info: dict, cfg: dict):
    from fastkd.engine.trainer import Diverged

    window = w0 + row // per
    cause = "its weights are not finite, or its forward overflowed"
    if cfg["train"]["bf16"]:
        cause += " in bf16 (train.bf16 = true: try --set train.bf16=false)"
    raise Diverged(f"the teacher's logits are not finite at position {row % per} of training window {window}: {cause}; "
                   f"the teacher is {teacher_info.get('checkpoint') or teacher_info['dir']}; no shard holding such rows "
                   "was written")


def run(args) -> int:
    from fastkd import teacher_cache as tc
    from fastkd.engine.cached_teacher import job_fingerprints, job_tokens
    from fastkd.engine.runner import _device
    from fastkd.engine.tasks import make_task

    k, selection, value_dtype = _check_args(args)
    cfg = _config(args)
    out = args.out or os.path.join("caches", f"{cfg['name']}-{'top' if selection == 'top_k' else 'sample'}{k}")
    teacher_out = args.teacher_out or f"{out.rstrip(os.sep)}-teacher"
    manifest_info = {}
    # Everything that can be refused is refused before a teacher is trained.
    if os.path.isfile(os.path.join(out, tc.MANIFEST)):
        if not args.resume:
            raise ConfigError(f"{out} already holds a teacher cache: pass --resume to continue it, or another --out")
        try:
            manifest_info = tc.read_manifest(out).get("info", {})
        except tc.CacheError as exc:
            raise ConfigError(str(exc)) from None
    elif os.path.isdir(out) and os.listdir(out):
        raise ConfigError(f"{out} is not empty and holds no teacher cache: choose an empty or new --out")
    elif args.resume and not os.path.isfile(os.path.join(teacher_out, "config.json")):
        raise ConfigError(f"--resume: {out} holds no cache to continue (and {teacher_out} no teacher run)")

    device = _device(cfg)
    checkpoint = cfg["teacher"]["path"] if os.path.isfile(cfg["teacher"]["path"]) else None
    if checkpoint:
        cfg = {**cfg, "teacher": {**cfg["teacher"], "path": ""}}  # the architecture comes from [teacher]
    task = make_task(cfg).to(device)
    task.teacher_checkpoint = checkpoint
    splits = task.load()
    task.check(splits)
    if k > splits.vocab_size:
        raise ConfigError(f"--{'top-k' if selection == 'top_k' else 'sample'} {k} is larger than the vocabulary ({splits.vocab_size})")
    quiet = not cfg["train"]["progress"]
    teacher, teacher_info, teacher_fp = _teacher(cfg, task, out, teacher_out, manifest_info, quiet)

    context = cfg["data"]["context"]
    per, windows = context - 1, len(splits.train.y)
    spec = tc.CacheSpec(top_k=k, vocab_size=splits.vocab_size, tokens=job_tokens(splits, context), values=args.values,
                        value_dtype=value_dtype, shard_tokens=args.shard_tokens, selection=selection,
                        fingerprints={**job_fingerprints(splits, context), "teacher": teacher_fp})
    try:
        writer = tc.CacheWriter(out, spec, resume=args.resume,
                                info={"teacher": teacher_info, "job": cfg["name"], "context": context, "seed": cfg["seed"]})
    except tc.CacheError as exc:
        raise ConfigError(str(exc)) from None
    if writer.complete:
        print(f"{out} is already complete ({spec.tokens} tokens)")
        return 0

    group = args.batch_windows
    first = writer.tokens_done // per // group * group
    skip = writer.tokens_done - first * per
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=spec.tokens, initial=writer.tokens_done, unit="tok", unit_scale=True, desc="cache-teacher",
                   file=sys.stderr, dynamic_ncols=True)
    started, done_before = time.perf_counter(), writer.tokens_done
    bf16 = cfg["train"]["bf16"]
    try:
        with torch.no_grad():
            for w0 in range(first, windows, group):
                x = splits.train.x[w0 : w0 + group].to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    hidden = task.forward(teacher, x)[:, :-1]
                logits = teacher.lm_head(hidden.float().reshape(-1, hidden.shape[-1]))
                # The rows go to the host next anyway (writer.add), so this check costs no extra
                # round trip of note; sampling must not see a NaN (multinomial refuses it).
                finite = torch.isfinite(logits).all(-1)
                if not bool(finite.all()):
                    _not_finite(int((~finite).nonzero()[0]), w0, per, teacher_info, cfg)
                if selection == "top_k":
                    idx, val = tc.top_k_rows(logits, k, args.values)
                else:
                    # One generator per group of windows, seeded by its first: a resumed write draws the same.
                    g = torch.Generator(device=logits.device).manual_seed(cfg["seed"] * 1_000_003 + w0)
                    idx, val = tc.sample_rows(logits, k, g)
                writer.add(idx[skip:], val[skip:])
                if bar is not None:
                    bar.update(idx.shape[0] - skip)
                skip = 0
        seconds = time.perf_counter() - started
        rate = (spec.tokens - done_before) / max(seconds, 1e-9)
        # This process's part (a resumed write times only what it wrote).
        writer.set_info(write={"tokens": spec.tokens - done_before, "seconds": round(seconds, 2),
                               "tokens_per_s": round(rate, 1), "batch_windows": group, "device": str(device)})
        writer.finish()
    except KeyboardInterrupt:
        raise CacheInterrupted(f"{writer.tokens_done} of {spec.tokens} tokens are in finished shards; "
                               f"continue with: fastkd cache-teacher ... --out {out} --resume") from None
    finally:
        if bar is not None:
            bar.close()
    cache = tc.TeacherCache(out)
    print(f"teacher cache {out}: {cache.tokens} tokens, {cache.describe()}, {cache.bytes / 2**20:.1f} MiB "
          f"({cache.bytes_per_token:.2f} B/token, bound {tc.storage_bound(k)}), {len(cache.shards)} shards; "
          f"{seconds:.1f} s, {rate:,.0f} tokens/s; teacher in {teacher_info['dir']}")
    print(f"distil from it with: fastkd distill {args.config or '--data lm'} --teacher-cache {out}")
    return 0
