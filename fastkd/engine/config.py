"""Job configuration: the schema, its defaults, TOML loading, overrides and validation.

A config is a TOML file whose tables mirror :data:`SCHEMA`; every key is optional and falls
back to the default below (``fastkd distill`` with no config runs exactly the defaults: the
ensemble-distillation experiment on digits). Loss terms form an array of tables ``[[loss]]``
whose keys depend on ``kind`` (see :mod:`fastkd.engine.losses`); their weighted sum is the
training loss of the distilled student(s).

Validation is strict, because a typo that silently falls back to a default wastes a run: an
unknown key, a value of the wrong type or outside its range raises :class:`ConfigError` with a
message naming the key.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tomllib
from typing import Any, Dict, List, Optional, Tuple

from fastkd.engine.losses import LOSS_TERMS
from fastkd.engine.schema import ConfigError, Field
from fastkd.engine.tasks import TASKS, task_name



METHODS = ("distill", "self_distill", "mutual", "stagewise")


def _model_table(arch, hidden, channels, dropout, count=None):
    t = {
        "arch": Field("str", arch, choices=("mlp", "cnn", "gpt2"), doc="model family (gpt2: data.name = 'lm' only)"),
        "hidden": Field("list_int", hidden, lo=1, doc="mlp: hidden widths (stem, then one block each)"),
        "channels": Field("list_int", channels, lo=1, doc="cnn: channels (stem, then one block each)"),
        "dropout": Field("float", dropout, lo=0.0, hi=0.9),
        "n_layer": Field("int", 2, lo=1, doc="gpt2: transformer blocks"),
        "n_embd": Field("int", 128, lo=1, doc="gpt2: width (a multiple of n_head)"),
        "n_head": Field("int", 2, lo=1, doc="gpt2: attention heads"),
        "n_positions": Field("int", 0, lo=0, doc="gpt2: context length the model supports (0: data.context)"),
        "path": Field("str", "", doc="gpt2: a local from_pretrained directory to start from (never a hub)"),
    }
    if count is not None:
        t["count"] = Field("int", count, lo=1, doc="ensemble size (teachers trained from seeds seed+1000+i)")
        t["epochs"] = Field("int", 0, lo=0, doc="epochs of the teachers' phase (0: train.epochs)")
        t["independent_batches"] = Field("bool", False, doc="each teacher its own batch order (default: only the init differs)")
        t["cache"] = Field("str", "", doc="lm: a teacher cache written by `fastkd cache-teacher`; the KD term reads the "
                           "teacher from it (fastkd.sparse_kd_loss) and no teacher is trained or run")
        t["cache_top_k"] = Field("int", 0, lo=0, doc="with teacher.cache: the K this job expects the cache to hold (0: any)")
    return t


SCHEMA: Dict[str, Any] = {
    "name": Field("str", "default", doc="run name (default run directory runs/<name>-<time>)"),
    "method": Field("str", "distill", choices=METHODS),
    "seed": Field("int", 0, lo=0),
    "out": Field("str", "", doc="run directory; empty: runs/<name>-<timestamp>"),
    "data": {
        "name": Field("str", "digits", doc="digits, multiview, lm (language modelling), or a path to an .npz with x and y"),
        "path": Field("str", "", doc="lm: your text (a folder of files, one file) or a .npy of token ids; empty: the embedded corpus"),
        "tokenizer": Field("str", "", doc="lm: a saved tokenizer.json (empty: a byte-level BPE trained on the training split)"),
        "vocab_size": Field("int", 8192, lo=258, doc="lm: the trained BPE's vocabulary size"),
        "context": Field("int", 128, lo=2, doc="lm: tokens per training window"),
        "documents": Field("int", 0, lo=0, doc="lm: embedded corpus: the first N modules of the fixed list (0: all)"),
        "val_fraction": Field("float", 0.2, lo=0.0, hi=0.5, lo_open=True),
        "test_fraction": Field("float", 0.3, lo=0.0, hi=0.5, lo_open=True),
        "fraction": Field("float", 1.0, lo=0.0, hi=1.0, lo_open=True, doc="fraction of the training split used"),
        "label_noise": Field("float", 0.0, lo=0.0, hi=0.95, doc="fraction of training labels flipped"),
        "imbalance": Field("float", 1.0, lo=0.0, hi=1.0, lo_open=True, doc="smallest/largest training class size"),
        "multiview": {
            "classes": Field("int", 10, lo=2),
            "dim": Field("int", 32, lo=4),
            "patches": Field("int", 8, lo=2),
            "samples": Field("int", 3000, lo=20),
            "single_view_fraction": Field("float", 0.2, lo=0.0, hi=1.0),
            "noise": Field("float", 0.15, lo=0.0),
            "weak_view": Field("float", 0.1, lo=0.0),
            "off_class": Field("float", 0.3, lo=0.0),
        },
    },
    "teacher": _model_table("mlp", [256, 256], [16, 32, 32], 0.0, count=3),
    "student": {
        **_model_table("mlp", [256, 256], [16, 32, 32], 0.0),
        "prune_amount": Field("float", 0.0, lo=0.0, hi=0.99, doc="final weight sparsity (l1, unstructured)"),
        "prune_epochs": Field("int", 0, lo=0, doc="epochs over which sparsity ramps up (0: half the epochs)"),
        "quant_bits": Field("int", 0, lo=0, hi=16, doc="quantization-aware training bits (0: off)"),
    },
    "train": {
        "epochs": Field("int", 60, lo=1),
        "batch_size": Field("int", 32, lo=1, doc="global batch (split across ranks)"),
        "optimizer": Field("str", "adamw", choices=("adamw", "sgd")),
        "lr": Field("float", 3e-3, lo=0.0, lo_open=True),
        "weight_decay": Field("float", 0.01, lo=0.0),
        "momentum": Field("float", 0.9, lo=0.0, hi=1.0),
        "schedule": Field("str", "cosine", choices=("constant", "cosine", "linear")),
        "warmup_steps": Field("int", 0, lo=0),
        "augment": Field("str", "none", choices=("none", "shift", "noise"),
                         doc="training-batch augmentation, the same batch for teachers and students"),
        "augment_strength": Field("float", 1.0, lo=0.0, doc="shift: max pixels; noise: std"),
        "grad_accum": Field("int", 1, lo=1, doc="micro-batches per optimizer step"),
        "grad_clip": Field("float", 0.0, lo=0.0, doc="max gradient norm (0: off)"),
        "bf16": Field("bool", False, doc="bf16 autocast for forward passes"),
        "device": Field("str", "cpu", choices=("cpu", "cuda", "auto")),
        "checkpoint_every": Field("int", 100, lo=0, doc="optimizer steps between checkpoints (0: phase ends only)"),
        "eval_every": Field("int", 0, lo=0, doc="optimizer steps between validations inside an epoch (0: epoch ends only)"),
        "progress": Field("bool", True),
        "deterministic": Field("bool", True, doc="torch.use_deterministic_algorithms"),
        "threads": Field("int", 1, lo=0, doc="torch.set_num_threads (0: leave as is; tiny models run fastest on one thread)"),
        "plot": Field("bool", True),
        "shard": Field("bool", False, doc="under torchrun: FSDP2 (fully_shard) instead of DDP"),
        "measure_memory": Field("bool", False, doc="profile one step per learner and phase for its peak memory"),
    },
    "self_distill": {"generations": Field("int", 2, lo=1, doc="distilled generations after generation 0")},
    "mutual": {"peers": Field("int", 2, lo=2)},
    "stagewise": {
        "student_stages": Field("list_str", ["stem", "blocks.0"], lo=0, doc="student module per stage"),
        "teacher_stages": Field("list_str", ["stem", "blocks.0"], lo=0, doc="teacher module per stage"),
        "fraction": Field("float", 1.0, lo=0.0, hi=1.0, lo_open=True, doc="fraction of training data for student phases"),
        "stage_epochs": Field("int", 0, lo=0, doc="epochs per stage and for the head (0: train.epochs)"),
    },
}

# The loss terms' own schemas live with the terms (fastkd.engine.losses) and are looked up there.
DEFAULT_LOSS = {
    "distill": [{"kind": "kd", "temperature": 4.0}],
    "self_distill": [{"kind": "kd", "temperature": 4.0}],
    "mutual": [{"kind": "ce"}, {"kind": "kd", "temperature": 1.0}],
    "stagewise": [],
}


# The language-model job, configs/lm.toml as a table: `fastkd distill --data lm` runs it with no
# file at hand (an installed fastkd has no configs/ folder). tests/test_engine_lm.py checks that
# the two are the same job.
LM_JOB = {
    "name": "lm", "method": "distill", "seed": 0,
    "data": {"name": "lm", "documents": 40, "vocab_size": 8192, "context": 128, "val_fraction": 0.02,
             "test_fraction": 0.08},
    "teacher": {"arch": "gpt2", "n_layer": 4, "n_embd": 256, "n_head": 4, "count": 1, "epochs": 2},
    "student": {"arch": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 2},
    "train": {"epochs": 1, "batch_size": 8, "lr": 0.001, "warmup_steps": 20, "threads": 1, "checkpoint_every": 50,
              "eval_every": 100, "measure_memory": True},
    "loss": [{"kind": "kd", "temperature": 1.0, "hard_weight": 0.2, "fused_head": True, "chunk_size": 128}],
}


def _defaults(schema: dict) -> dict:
    return {k: (_defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default)) for k, v in schema.items()}


def default_config() -> dict:
    """The embedded default job (the ensemble-distillation experiment on digits)."""
    cfg = _defaults(SCHEMA)
    cfg["loss"] = copy.deepcopy(DEFAULT_LOSS["distill"])
    return validate(cfg)


def _merge(schema: dict, base: dict, user: dict, where: str) -> None:
    for key, value in user.items():
        path = f"{where}{key}"
        if key not in schema:
            known = ", ".join(sorted(schema))
            table = f"[{where[:-1]}]" if where else "the top level"
            raise ConfigError(f"unknown key {path!r} (keys allowed in {table}: {known})")
        spec = schema[key]
        if isinstance(spec, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} must be a table, got {type(value).__name__} {value!r}")
            _merge(spec, base[key], value, path + ".")
        else:
            base[key] = spec.check(path, value)


def _check_losses(losses: Any) -> List[dict]:
    if not isinstance(losses, list) or not all(isinstance(t, dict) for t in losses):
        raise ConfigError("loss must be an array of tables ([[loss]] entries)")
    out = []
    for i, term in enumerate(losses):
        where = f"loss[{i}]"
        kind = term.get("kind")
        if kind not in LOSS_TERMS:
            raise ConfigError(f"{where}.kind must be one of {', '.join(map(repr, sorted(LOSS_TERMS)))}, got {kind!r}")
        schema = {"kind": Field("str", kind), **LOSS_TERMS[kind].SCHEMA}
        full = {k: copy.deepcopy(f.default) for k, f in schema.items()}
        _merge(schema, full, term, where + ".")
        for k, f in schema.items():
            if full[k] is None and f.default is None and getattr(f, "required", False):
                raise ConfigError(f"{where}.{k} is required for kind {kind!r}")
        LOSS_TERMS[kind].validate(full, where)
        out.append(full)
    return out


def validate(cfg: dict) -> dict:
    """Cross-field checks on a merged config; returns it (loss terms filled with defaults)."""
    cfg["loss"] = _check_losses(cfg["loss"])
    method = cfg["method"]
    TASKS[task_name(cfg)].validate(cfg)
    if cfg["data"]["val_fraction"] + cfg["data"]["test_fraction"] >= 0.9:
        raise ConfigError("data.val_fraction + data.test_fraction must leave at least 10% for training")
    kinds = [t["kind"] for t in cfg["loss"]]
    if method in ("distill", "self_distill", "mutual") and not cfg["loss"]:
        raise ConfigError(f"method {method!r} needs at least one [[loss]] term")
    if method == "mutual" and "feature" in kinds:
        raise ConfigError("method 'mutual' supports logit terms only (kind 'kd', 'dkd' and 'ce'), not 'feature'")
    if method == "stagewise":
        st = cfg["stagewise"]
        if len(st["student_stages"]) != len(st["teacher_stages"]) or not st["student_stages"]:
            raise ConfigError(
                "stagewise.student_stages and stagewise.teacher_stages must be non-empty lists of the same length, "
                f"got {len(st['student_stages'])} and {len(st['teacher_stages'])}"
            )
    if cfg["student"]["prune_amount"] > 0 and cfg["student"]["quant_bits"] > 0:
        raise ConfigError("student.prune_amount and student.quant_bits cannot be combined (choose one)")
    if cfg["train"]["shard"] and (cfg["student"]["prune_amount"] > 0 or cfg["student"]["quant_bits"] > 0):
        raise ConfigError("train.shard (FSDP2) cannot be combined with a pruned or quantized student")
    for i, term in enumerate(cfg["loss"]):
        for key in ("tail", "values"):
            if term.get(key) and not cfg["teacher"]["cache"]:
                raise ConfigError(f"loss[{i}].{key} applies to a teacher read from a cache (teacher.cache), and this job has none")
    if cfg["student"]["quant_bits"] == 1:
        raise ConfigError("student.quant_bits must be 0 (off) or at least 2")
    return cfg


def parse_value(text: str) -> Any:
    """A ``--set key=value`` value: TOML syntax (``3``, ``0.5``, ``true``, ``[1, 2]``, ``"x"``),
    falling back to a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: List[str]) -> List[Tuple[str, Any]]:
    """``--set KEY=VALUE`` items as ``(dotted key, value)`` pairs (TOML value syntax)."""
    overrides = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        overrides.append((key.strip(), parse_value(value.strip())))
    return overrides


def load_config(
    path: Optional[str] = None, overrides: Optional[List[Tuple[str, Any]]] = None, base: Optional[dict] = None
) -> dict:
    """Defaults, then ``base`` (a config dict, e.g. a run's saved ``config.json``) or the TOML
    file at ``path``, then ``overrides`` (dotted key, value) on top.

    Raises :class:`ConfigError` for a missing or unreadable file, invalid TOML, unknown keys and
    wrong types.
    """
    user: dict = copy.deepcopy(base) if base is not None else {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path, "rb") as f:
                user = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML ({exc})") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config ({exc.strerror})") from None
    for key, value in overrides or []:
        parts = key.split(".")
        if parts[0] == "loss" and "loss" not in user and len(parts) > 1:
            # `--set loss.0.x=...` on a config without [[loss]] tables edits the method's default terms.
            method = user.get("method", SCHEMA["method"].default)
            user["loss"] = copy.deepcopy(DEFAULT_LOSS.get(method, []))
        node = user
        for i, p in enumerate(parts[:-1]):
            if isinstance(node, list):
                # An array of tables ([[loss]]) is addressed by index: loss.0.temperature.
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"cannot set {key}: {'.'.join(parts[:i])} has {len(node)} entries, {p!r} is not one of 0..{len(node) - 1}")
                node = node[int(p)]
            else:
                node = node.setdefault(p, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"cannot set {key}: {p} is not a table")
        if isinstance(node, list):
            raise ConfigError(f"cannot set {key}: {'.'.join(parts[:-1])} is an array of tables; name an entry and a key, e.g. {parts[0]}.0.weight")
        node[parts[-1]] = value
    cfg = _defaults(SCHEMA)
    losses = user.pop("loss", None)
    _merge(SCHEMA, cfg, user, "")
    cfg["loss"] = copy.deepcopy(DEFAULT_LOSS[cfg["method"]]) if losses is None else losses
    return validate(cfg)


# Settings that do not change what a run computes (display, threads, profiling).
_INCIDENTAL = ("progress", "threads", "plot", "measure_memory")

# Settings a run may change when it is resumed (`fastkd distill --resume DIR --set KEY=VALUE`):
# how large a step the optimizer takes and how it is guarded, which is what a diverged run
# needs changed to continue from its last good checkpoint. They apply from the checkpoint on;
# what was trained before it stays. Everything else (data, models, losses, batch sizes, epochs
# and schedule, seeds) decides which batches and models a checkpoint's position refers to, and
# must stay as it was.
RESUMABLE = ("train.lr", "train.grad_clip", "train.bf16", "train.checkpoint_every")


def fingerprint(cfg: dict) -> str:
    """A hash of everything that determines a run's results (not where it is written)."""
    relevant = {k: v for k, v in cfg.items() if k not in ("out",)}
    relevant["train"] = {k: v for k, v in cfg["train"].items() if k not in _INCIDENTAL}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def run_identity(cfg: dict) -> str:
    """The fingerprint without the :data:`RESUMABLE` settings: what a resumed run must share
    with the run it continues."""
    resumable = {key.split(".", 1)[1] for key in RESUMABLE}
    return fingerprint({**cfg, "train": {k: v for k, v in cfg["train"].items() if k not in resumable}})


def changed_settings(old: dict, new: dict) -> Dict[str, list]:
    """The :data:`RESUMABLE` settings whose values differ, ``{"train.lr": [old, new]}``."""
    out = {}
    for key in RESUMABLE:
        table, name = key.split(".", 1)
        a, b = old.get(table, {}).get(name), new[table][name]
        if a != b:
            out[key] = [a, b]
    return out


def describe_difference(a: dict, b: dict, prefix: str = "") -> Optional[str]:
    """The first dotted key whose value differs between two configs (for error messages)."""
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = describe_difference(va, vb, f"{prefix}{key}.")
            if d:
                return d
        elif va != vb:
            return f"{prefix}{key} ({va!r} there, {vb!r} here)"
    return None
