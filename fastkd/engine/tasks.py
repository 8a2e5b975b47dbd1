"""Tasks: what a kind of problem means to the engine, behind one seam.

Classification and language modelling differ in four places: the data, how models are built,
what the loss consumes (logits, or hidden states and the output layer that a fused head reads
without forming logits), and the metrics. A :class:`Task` answers those four questions; the
runner, the trainer and the plans ask it and never look at the data's name. A task is
registered with :func:`register_task`; :func:`task_name` picks it from a config.

- ``classification``: the registered datasets of :mod:`fastkd.data` (digits, multiview, an
  ``.npz``), the engine's MLP/CNN classifiers, logits per sample, accuracy/NLL/ECE and, for
  students, agreement and predictive KL on whole evaluation sets.
- ``lm``: text (:mod:`fastkd.text`), GPT-2 models, per token hidden states before ``lm_head``
  with the Hugging Face label shift (position ``i`` predicts token ``i + 1``; ``-100`` counts
  nowhere), and token NLL, perplexity, next-token accuracy, agreement and predictive KL per
  token, summed batch by batch (no ``[tokens, V]`` tensor of a whole split ever exists) and
  across ranks. Its teacher may instead be read from a teacher cache (``teacher.cache``,
  written by ``fastkd cache-teacher``; :mod:`fastkd.engine.cached_teacher`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from fastkd import data as datamod
from fastkd import metrics
from fastkd.engine import distributed as dist
from fastkd.engine.cached_teacher import CachedTeacher
from fastkd.engine.losses import IGNORE_INDEX
from fastkd.engine.schema import ConfigError

TASKS: Dict[str, type] = {}

# The name a learner gives as its teacher when the teacher is read from a cache, not run.
CACHED_TEACHER = "teacher_cache"


def register_task(name: str):
    def deco(cls):
        cls.NAME = name
        TASKS[name] = cls
        return cls

    return deco


def task_name(cfg: dict) -> str:
    """The task a config describes: language modelling on ``data.name = "lm"``, classification
    on every other dataset."""
    return "lm" if cfg["data"]["name"] == "lm" else "classification"


def make_task(cfg: dict) -> "Task":
    return TASKS[task_name(cfg)](cfg)


@dataclass
class Member:
    """A model taking part in an evaluation: its name, how to get it (built only when its
    predictions are not cached), and whether it is finished (its predictions may be cached)."""

    name: str
    get: Callable[[], nn.Module]
    finished: bool = True


@dataclass
class View:
    """What the loss terms see of one model on one batch: ``logits`` ``[N, V]``, or ``hidden``
    ``[N, H]`` and the output layer ``head``, whose logits the model soft-caps at ``softcap``
    (None: not capped); the ``labels`` ``[N]`` aligned with the rows; ``masked``: labels may
    hold ``-100`` rows."""

    labels: torch.Tensor
    logits: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None
    head: Optional[nn.Module] = None
    masked: bool = False
    softcap: Optional[float] = None


class Task:
    NAME = ""
    UNIT = "samples"  # what throughput counts
    # The methods and loss kinds the task runs (None: all).
    METHODS: Optional[Tuple[str, ...]] = None
    LOSS_KINDS: Optional[Tuple[str, ...]] = None

    def __init__(self, cfg: dict):
        self.cfg = cfg

    @classmethod
    def validate(cls, cfg: dict) -> None:
        """Config checks that need no data; raise :class:`ConfigError`."""
        if cls.METHODS is not None and cfg["method"] not in cls.METHODS:
            raise ConfigError(f"method {cfg['method']!r} is not available for the {cls.NAME} task "
                              f"(data.name = {cfg['data']['name']!r}); choose {', '.join(map(repr, cls.METHODS))}")
        for i, term in enumerate(cfg["loss"]):
            if cls.LOSS_KINDS is not None and term["kind"] not in cls.LOSS_KINDS:
                raise ConfigError(f"loss[{i}].kind {term['kind']!r} is not available for the {cls.NAME} task; "
                                  f"choose {', '.join(map(repr, cls.LOSS_KINDS))}")

    # -- data ------------------------------------------------------------------------------------
    def load(self):
        """The splits (``train``, ``val``, ``test``: :class:`fastkd.data.Dataset`); data errors
        become :class:`ConfigError`."""
        raise NotImplementedError

    def check(self, splits) -> None:
        """Checks that need the data (module paths, vocabularies); raise :class:`ConfigError`."""

    def subset(self, data: datamod.Dataset, fraction: float, seed: int) -> datamod.Dataset:
        return data

    def batch(self, data: datamod.Dataset, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return data.x[idx], data.y[idx]

    def units(self, labels: torch.Tensor) -> int:
        """How many rows of the loss a batch's labels make (its weight in an accumulation)."""
        return len(labels)

    def describe(self, splits) -> dict:
        raise NotImplementedError

    # -- models ----------------------------------------------------------------------------------
    def build(self, role: str, seed: int) -> nn.Module:
        raise NotImplementedError

    def shard_units(self, model: nn.Module) -> List[nn.Module]:
        """Submodules sharded on their own under ``train.shard`` (the rest with the model)."""
        return []

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The part of the model that runs inside its (DDP/FSDP) wrapper."""
        return model(x)

    def view(self, model: nn.Module, out: torch.Tensor, labels: torch.Tensor) -> View:
        return View(labels, logits=out)

    # -- metrics ---------------------------------------------------------------------------------
    def evaluate(self, data: datamod.Dataset, members: List[Member], reference: Optional[List[Member]],
                 cache: dict) -> Dict[str, float]:
        """Metrics of the ensemble of ``members`` on ``data`` (with agreement and predictive KL
        against the ensemble of ``reference``); ``cache`` keeps predictions of finished models
        between calls on the same data."""
        raise NotImplementedError

    # -- a teacher read from a cache (tasks that support one override these) --------------------
    teacher_cache: Optional[CachedTeacher] = None  # when the job reads one

    def external_models(self) -> Dict[str, dict]:
        """Finished models the job did not train (store entries, ``state`` None: :meth:`build`
        loads them), e.g. the teacher a cache was written with, to measure students against."""
        return {}

    def cached_teacher(self, windows: torch.Tensor):
        """The cached teacher (:class:`fastkd.engine.losses.SparseTeacher`) of a batch of
        training samples, by their indices."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: torch.device) -> "Task":
        self._device = device
        return self


@torch.no_grad()
def predict_log_probs(model: nn.Module, x: torch.Tensor, device: torch.device, bf16: bool = False) -> torch.Tensor:
    """Float64 log-probabilities ``[N, V]`` of ``model`` on ``x`` in eval mode (mode restored)."""
    was = model.training
    model.eval()
    outs = []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(x), 1024):
            outs.append(model(x[i : i + 1024].to(device)).float().cpu())
    model.train(was)
    return metrics.log_probs(torch.cat(outs))


@register_task("classification")
class ClassificationTask(Task):
    LOSS_KINDS = ("kd", "dkd", "ce", "feature")

    @classmethod
    def validate(cls, cfg: dict) -> None:
        super().validate(cfg)
        if cfg["teacher"]["cache"]:
            raise ConfigError("teacher.cache holds a language model's teacher: it needs data.name = 'lm'")
        for role in ("teacher", "student"):
            arch = cfg[role]["arch"]
            if cfg[role]["path"]:
                # Said rather than ignored: a user pointing at a model expects it to be used.
                raise ConfigError(f"{role}.path loads a GPT-2 model (data.name = 'lm'); a classification job builds "
                                  f"its {role} from [{role}]")
            if arch == "gpt2":
                raise ConfigError(f"{role}.arch 'gpt2' is a language model: it needs data.name = 'lm'")
            key = "hidden" if arch == "mlp" else "channels"
            if not cfg[role][key]:
                raise ConfigError(f"{role}.{key} must not be empty for arch {arch!r}")
        for i, term in enumerate(cfg["loss"]):
            if term["kind"] == "kd" and term["fused_head"]:
                for key in ("student_head", "teacher_head"):
                    if not term[key]:
                        raise ConfigError(f"loss[{i}].{key} (the output layer's module path) is required with fused_head = true")

    def load(self):
        d, cfg = self.cfg["data"], self.cfg
        try:
            self.splits = datamod.load_dataset(
                d["name"], d["multiview"] if d["name"] == "multiview" else {}, seed=cfg["seed"],
                val_fraction=d["val_fraction"], test_fraction=d["test_fraction"], fraction=d["fraction"],
                imbalance_ratio=d["imbalance"], noise=d["label_noise"],
            )
        except datamod.DataError as exc:
            raise ConfigError(f"data.name: {exc}") from None
        return self.splits

    def check(self, splits) -> None:
        """Every module path a loss term or a stage names must exist in its model."""
        from fastkd.engine.losses import RELATIONAL_METRICS, relational_loss_fn
        from fastkd.engine.models import get_module

        cfg = self.cfg
        try:
            models = {r: self.build(r, seed=0) for r in ("teacher", "student")}
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        # In self-distillation the teacher is an earlier student.
        teacher_role = "student" if cfg["method"] == "self_distill" else "teacher"
        checks = []
        for i, term in enumerate(cfg["loss"]):
            if term["kind"] == "feature":
                if term["metric"] in RELATIONAL_METRICS and relational_loss_fn(term["metric"]) is None:
                    raise ConfigError(
                        f"loss[{i}].metric {term['metric']!r} needs fastkd.{term['metric']}_loss, which this fastkd does not have yet"
                    )
                checks.append((f"loss[{i}].student", term["student"], "student"))
                checks.append((f"loss[{i}].teacher", term["teacher"], teacher_role))
                if term["teacher_index"] >= (cfg["teacher"]["count"] if cfg["method"] == "distill" else 1):
                    raise ConfigError(f"loss[{i}].teacher_index={term['teacher_index']} but there are fewer teachers")
        if cfg["method"] == "stagewise":
            for sp in cfg["stagewise"]["student_stages"]:
                checks.append(("stagewise.student_stages", sp, "student"))
            for tp in cfg["stagewise"]["teacher_stages"]:
                checks.append(("stagewise.teacher_stages", tp, "teacher"))
        for key, path, role in checks:
            try:
                get_module(models[role], path, role)
            except LookupError as exc:
                raise ConfigError(f"{key}: {exc}") from None

    def subset(self, data, fraction, seed):
        # The same stratified subset for every phase with that fraction.
        return datamod.stratified_fraction(data, fraction, np.random.default_rng(seed + 31337))

    def batch(self, data, idx):
        t = self.cfg["train"]
        return datamod.augment(data.x[idx], t["augment"], data.input_shape, t["augment_strength"]), data.y[idx]

    def describe(self, splits) -> dict:
        counts = torch.bincount(splits.train.y, minlength=splits.num_classes).tolist()
        return {"name": self.cfg["data"]["name"], "train": len(splits.train.y), "val": len(splits.val.y),
                "test": len(splits.test.y), "train_class_counts": counts, "noisy_labels": splits.noisy_labels}

    def build(self, role, seed):
        from fastkd.engine.models import build_model

        return build_model(self.cfg[role], self.splits.input_shape, self.splits.num_classes, seed)

    def evaluate(self, data, members, reference, cache):
        bf16 = self.cfg["train"]["bf16"]

        def log_probs(m: Member) -> torch.Tensor:
            if m.finished and m.name in cache:
                return cache[m.name]
            lp = predict_log_probs(m.get(), data.x, self.device, bf16)
            if m.finished:
                cache[m.name] = lp
            return lp

        def ensemble(group: List[Member]) -> torch.Tensor:
            lps = [log_probs(m) for m in group]
            return lps[0] if len(lps) == 1 else metrics.ensemble_log_probs(lps)

        return metrics.classification_metrics(ensemble(members), data.y, ensemble(reference) if reference else None)


@register_task("lm")
class LMTask(Task):
    UNIT = "tokens"
    METHODS = ("distill",)
    LOSS_KINDS = ("kd", "ce")
    EVAL_BATCH = 8  # windows per evaluation batch: bounds the [rows, V] float64 buffers

    @classmethod
    def validate(cls, cfg: dict) -> None:
        super().validate(cfg)
        for role in ("teacher", "student"):
            if cfg[role]["arch"] != "gpt2":
                raise ConfigError(f"{role}.arch must be 'gpt2' for data.name = 'lm', got {cfg[role]['arch']!r}")
        if cfg["teacher"]["count"] != 1:
            raise ConfigError(f"teacher.count must be 1 for data.name = 'lm' (one teacher language model), got {cfg['teacher']['count']}")
        for i, term in enumerate(cfg["loss"]):
            if term["kind"] == "kd" and (term["student_head"] or term["teacher_head"]):
                raise ConfigError(f"loss[{i}].student_head/teacher_head do not apply to data.name = 'lm': "
                                  "the fused head reads the hidden states entering lm_head")
        if cfg["train"]["augment"] != "none":
            raise ConfigError("train.augment applies to classification inputs, not to token windows: set it to 'none'")
        d = cfg["data"]
        if d["fraction"] != 1.0 or d["label_noise"] or d["imbalance"] != 1.0:
            raise ConfigError("data.fraction, data.label_noise and data.imbalance apply to classification data, not to data.name = 'lm'")
        if cfg["teacher"]["cache"]:
            CachedTeacher.check_config(cfg)

    def load(self):
        from fastkd import text

        d = dict(self.cfg["data"])
        try:
            # Rank 0 trains (or finds) the tokenizer first, so the other ranks read it from the cache.
            if dist.world_size() > 1 and not dist.is_main():
                dist.barrier()
            self.splits = text.load_text(d, self.cfg["seed"])
            if dist.world_size() > 1 and dist.is_main():
                dist.barrier()
        except datamod.DataError as exc:
            if dist.world_size() > 1 and dist.is_main():
                dist.barrier()
            raise ConfigError(str(exc)) from None
        return self.splits

    def check(self, splits) -> None:
        if self.cfg["teacher"]["cache"]:
            self.teacher_cache = CachedTeacher(self.cfg, splits, lambda where: self.build("teacher", 0, path=where))
        # A cached teacher is not built; the one it was written with is, only to be measured against.
        roles = ("student",) if self.teacher_cache is not None else ("teacher", "student")
        for role in roles:
            try:
                self.build(role, seed=0)
            except (ValueError, LookupError) as exc:
                raise ConfigError(f"{role}: {exc}") from None

    def external_models(self):
        if self.teacher_cache is None or self.teacher_cache.teacher_dir is None:
            return {}
        return {"teacher_0": {"role": "teacher", "state": None, "cost": None}}

    def cached_teacher(self, windows):
        return self.teacher_cache.batch(windows)

    @torch.no_grad()
    def cache_fidelity(self, model: nn.Module, windows: int = 64) -> Dict[str, float]:
        """Agreement and predictive KL of ``model`` against the cached teacher itself, on the
        first ``windows`` training windows (the cache covers the training split only): top-1
        agreement with the cache's most probable entry, and KL from the cached row (its K
        entries renormalised) to the model's full distribution."""
        was = model.training
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64)  # agree, kl, tokens, tokens whose output is no distribution
        n = min(windows, len(self.splits.train.y))
        for w0 in range(0, n, self.EVAL_BATCH):
            ids = torch.arange(w0, min(n, w0 + self.EVAL_BATCH))
            x = self.splits.train.x[ids].to(self.device)
            keep = self.splits.train.y[ids, 1:].reshape(-1).to(self.device) != IGNORE_INDEX
            h = self.forward(model, x)[:, :-1]
            lp = torch.log_softmax(model.lm_head(h.float().reshape(-1, h.shape[-1])).double(), -1)[keep]
            t = self.cached_teacher(ids)
            idx, val = t.indices.to(self.device)[keep], t.values.to(self.device).double()[keep]
            lp_t = torch.log_softmax(val, -1)
            top1 = idx.gather(1, val.argmax(-1, keepdim=True)).squeeze(1)
            sums[0] += float((lp.argmax(-1) == top1).sum())
            p_t = lp_t.exp()
            sums[1] += float(torch.where(p_t > 0, p_t * (lp_t - lp.gather(1, idx)), torch.zeros_like(p_t)).sum())
            sums[2] += int(keep.sum())
            sums[3] += int(metrics.undefined_rows(lp).sum())
        model.train(was)
        total = max(float(sums[2]), 1.0)
        if sums[3]:  # a diverged model neither agrees with the cache nor is at a finite KL from it
            return {"agreement": math.nan, "predictive_kl": math.nan}
        return {"agreement": float(sums[0]) / total, "predictive_kl": float(sums[1]) / total}

    def describe(self, splits) -> dict:
        from fastkd import text

        return {"name": "lm", "context": self.cfg["data"]["context"], **text.describe(splits),
                "windows": {k: len(getattr(splits, k).y) for k in ("train", "val", "test")}}

    def subset(self, data, fraction, seed):
        return data

    def units(self, labels):
        return int((labels[:, 1:] != IGNORE_INDEX).sum())

    def build(self, role, seed, path: Optional[str] = None):
        """``role``'s GPT-2 as its config table says, or read from the ``from_pretrained``
        directory ``path`` (for a job reading a cache, the teacher defaults to the one the
        cache was written with)."""
        from fastkd.engine.models import build_gpt2

        s, spec = self.splits, self.cfg[role]
        if path is None and role == "teacher" and self.teacher_cache is not None:
            path = self.teacher_cache.teacher_dir
        if path:
            spec = {**spec, "path": path}
        return build_gpt2(spec, s.vocab_size, self.cfg["data"]["context"], s.eos_id, seed)

    def shard_units(self, model):
        return list(model.transformer.h)

    def forward(self, model, x):
        # The body only: lm_head is applied by the loss (or fused into it).
        return model.transformer(input_ids=x).last_hidden_state

    def view(self, model, out, labels):
        # Hugging Face's shift: the hidden state at position i predicts the label at i + 1.
        hidden = out[:, :-1].reshape(-1, out.shape[-1])
        # A model that soft-caps its logits (Gemma 2/3) says so in its config: the loss caps them too.
        softcap = getattr(model.config, "final_logit_softcapping", None)
        return View(labels[:, 1:].reshape(-1), hidden=hidden, head=model.lm_head, masked=True, softcap=softcap)

    @torch.no_grad()
    def evaluate(self, data, members, reference, cache):
        dev, bf16 = self.device, self.cfg["train"]["bf16"]
        models = [m.get() for m in members]
        refs = [m.get() for m in reference] if reference else []
        modes = [m.training for m in models + refs]
        for m in models + refs:
            m.eval()
        # float64 sums: nll, correct, agree, kl, tokens, and the tokens whose output is no
        # distribution (a NaN: see fastkd.metrics) of the models, then of models or reference.
        # Each rank takes every world-th batch.
        sums = torch.zeros(7, dtype=torch.float64)
        starts = list(range(0, len(data.y), self.EVAL_BATCH))[dist.rank() :: dist.world_size()]

        def log_probs(group, x):
            lps = []
            for m in group:
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                    h = self.forward(m, x)[:, :-1]
                lps.append(torch.log_softmax(m.lm_head(h.float().reshape(-1, h.shape[-1])).double(), -1))
            return lps[0] if len(lps) == 1 else metrics.ensemble_log_probs(lps)

        for i in starts:
            x = data.x[i : i + self.EVAL_BATCH].to(dev)
            y = data.y[i : i + self.EVAL_BATCH, 1:].reshape(-1).to(dev)
            keep = y != IGNORE_INDEX
            y = y[keep]
            lp = log_probs(models, x)[keep]
            pred = lp.argmax(-1)
            sums[0] += float(-lp.gather(1, y.view(-1, 1)).sum())
            sums[1] += float((pred == y).sum())
            undefined = metrics.undefined_rows(lp)
            sums[5] += float(undefined.sum())
            if refs:
                lt = log_probs(refs, x)[keep]
                sums[2] += float((pred == lt.argmax(-1)).sum())
                sums[3] += float((lt.exp() * (lt - lp)).sum())
                sums[6] += float((undefined | metrics.undefined_rows(lt)).sum())
            sums[4] += len(y)
        for m, mode in zip(models + refs, modes):
            m.train(mode)
        sums = dist.all_reduce_sum(sums)
        n = max(float(sums[4]), 1.0)
        nan = float(sums[5]) > 0
        out = {"nll": math.nan if nan else float(sums[0]) / n, "accuracy": math.nan if nan else float(sums[1]) / n}
        out["perplexity"] = math.nan if nan else math.exp(min(out["nll"], 700.0))
        if refs:
            nan = float(sums[6]) > 0
            out["agreement"] = math.nan if nan else float(sums[2]) / n
            out["predictive_kl"] = math.nan if nan else float(sums[3]) / n
        return out
