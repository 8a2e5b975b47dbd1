"""The training loop: one *phase* trains a group of learners together on the same batches.

Training several models in one loop is what lets frozen teachers run once per batch for all
students (a baseline and a distilled student see identical batches, so the only difference
between them is the loss) and what mutual learning needs (peers read each other's outputs of
the same batch). A job (:mod:`fastkd.engine.runner`) is a sequence of phases; each finished
model is kept, by name, in a store that later phases read their teachers from.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from fastkd import metrics
from fastkd.data import Dataset, augment, stratified_fraction
from fastkd.engine import compress, distributed as dist
from fastkd.engine.losses import FeatureTap, LossTerm, StepOutputs, TeacherOutputs
from fastkd.engine.models import build_model, get_module


@dataclass
class LearnerSpec:
    """A model trained in a phase.

    ``role`` names the config table (``teacher``/``student``) giving its architecture; ``seed``
    its initialisation. It distils from the ensemble of frozen finished models ``teachers`` or,
    for mutual learning, of the current outputs of the other learners ``peers``. ``reference``
    names the models whose ensemble its agreement/predictive KL are measured against.
    ``trainable``/``frozen`` restrict which modules train; ``init_from`` starts from a finished
    model; ``compress`` applies the student's pruning/QAT settings.
    """

    name: str
    role: str
    seed: int
    terms: List[LossTerm]
    teachers: List[str] = field(default_factory=list)
    peers: List[str] = field(default_factory=list)
    reference: List[str] = field(default_factory=list)
    init_from: Optional[str] = None
    trainable: Optional[List[str]] = None
    frozen: List[str] = field(default_factory=list)
    compress: bool = False


@dataclass
class Phase:
    name: str
    learners: List[LearnerSpec]
    epochs: int
    fraction: float = 1.0
    # False: every learner draws its own batch order (ensemble members trained independently,
    # as if one after the other); only for phases without frozen teachers or peers.
    shared_batches: bool = True


@dataclass
class Context:
    """What a phase needs from the job: config, data, device, the store of finished models
    (name -> ``{"role", "state"}``), a metrics sink and a checkpoint callback."""

    cfg: dict
    train: Dataset
    val: Dataset
    device: torch.device
    store: Dict[str, dict]
    log: Callable[[dict], None]
    save_checkpoint: Callable[[dict], None]


class LearnerModule(nn.Module):
    """A model and its regressors as one module, so that one DDP wrapper syncs both."""

    def __init__(self, model: nn.Module, regressors: nn.ModuleDict):
        super().__init__()
        self.model, self.regressors = model, regressors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def frozen_model(ctx: Context, name: str) -> nn.Module:
    """A finished model from the store, in eval mode, without gradients."""
    entry = ctx.store[name]
    model = build_model(ctx.cfg[entry["role"]], ctx.train.input_shape, ctx.train.num_classes, seed=0)
    model.load_state_dict(entry["state"])
    model.to(ctx.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _lr_lambda(cfg: dict, total_steps: int):
    warm, kind = cfg["warmup_steps"], cfg["schedule"]

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - progress
        return 1.0

    return f


class Learner:
    """A model being trained: the module, hooks, regressors, optimizer and LR schedule."""

    def __init__(self, spec: LearnerSpec, ctx: Context, teacher_models: Dict[str, nn.Module], total_steps: int):
        cfg, dev = ctx.cfg, ctx.device
        self.spec = spec
        role_cfg = cfg[spec.role]
        self.model = build_model(role_cfg, ctx.train.input_shape, ctx.train.num_classes, spec.seed)
        if spec.init_from is not None:
            self.model.load_state_dict(ctx.store[spec.init_from]["state"])
        self.compressed = spec.compress and (role_cfg.get("prune_amount", 0) > 0 or role_cfg.get("quant_bits", 0) > 0)
        if self.compressed:
            compress.prepare(self.model, role_cfg)
        self.model.to(dev)
        self._set_trainable()
        self.tap = FeatureTap(self.model, [p for t in spec.terms for p in t.student_paths()], spec.role)
        self.regressors = self._make_regressors(ctx, teacher_models)
        self.module = LearnerModule(self.model, self.regressors).to(dev)
        self.wrapped = dist.wrap(self.module, dev)
        params = [p for p in self.module.parameters() if p.requires_grad]
        t = cfg["train"]
        if t["optimizer"] == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
        else:
            self.optimizer = torch.optim.SGD(params, lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(t, total_steps))
        self.loss_sum, self.loss_count = 0.0, 0
        self.term_sums = [0.0] * len(spec.terms)  # per-term sums, logged per epoch

    def term_means(self) -> dict:
        """Mean value of each loss term over the epoch so far, keyed ``<kind><index>``."""
        return {f"{t.KIND}{t.index}": s / max(1, self.loss_count) for t, s in zip(self.spec.terms, self.term_sums)}

    def _set_trainable(self) -> None:
        spec = self.spec
        if spec.trainable is not None:
            for p in self.model.parameters():
                p.requires_grad_(False)
            for path in spec.trainable:
                for p in get_module(self.model, path, spec.role).parameters():
                    p.requires_grad_(True)
        for path in spec.frozen:
            for p in get_module(self.model, path, spec.role).parameters():
                p.requires_grad_(False)

    def _make_regressors(self, ctx: Context, teacher_models: Dict[str, nn.Module]) -> nn.ModuleDict:
        regs = nn.ModuleDict()
        feature_terms = [t for t in self.spec.terms if t.student_paths()]
        if not feature_terms:
            return regs
        # A dry forward on two samples gives the feature shapes the regressors must map between.
        x = ctx.train.x[:2].to(ctx.device)
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            self.model(x)
            s_feats = self.tap.take()
            t_feats = []
            for name in self.spec.teachers:
                tap = FeatureTap(teacher_models[name], [p for t in feature_terms for p in t.teacher_paths()], "teacher")
                teacher_models[name](x)
                t_feats.append(tap.take())
                tap.remove()
        self.model.train(was_training)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.spec.seed + 17)
            for term in feature_terms:
                reg = term.make_regressor(s_feats, t_feats[term.spec["teacher_index"]])
                if reg is not None:
                    regs[str(term.index)] = reg
        return regs

    def state(self) -> dict:
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loss": [self.loss_sum, self.loss_count, list(self.term_sums)],
        }

    def load(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loss_sum, self.loss_count, self.term_sums = state["loss"]

    def trainable_params(self) -> List[torch.Tensor]:
        return [p for p in self.module.parameters() if p.requires_grad]


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


def phase_train_set(ctx: Context, phase: Phase) -> Dataset:
    """The training data of a phase: a stratified ``fraction`` of the training split, the same
    subset for every phase with that fraction."""
    rng = np.random.default_rng(ctx.cfg["seed"] + 31337)
    return stratified_fraction(ctx.train, phase.fraction, rng)


def _epoch_order(seed: int, phase_index: int, epoch: int, n: int) -> torch.Tensor:
    # Each epoch's order depends only on (seed, phase, epoch): a resumed run sees the same batches.
    g = torch.Generator().manual_seed(seed * 1_000_003 + phase_index * 10_007 + epoch)
    return torch.randperm(n, generator=g)


def run_phase(ctx: Context, phase_index: int, phase: Phase, resume: Optional[dict] = None) -> Dict[str, nn.Module]:
    """Train ``phase`` to its end and return its trained models by name (compression baked in).

    ``resume`` is the ``"phase_state"`` of a checkpoint taken inside this phase: learner states,
    RNG states, position (epoch, next batch) and optimizer-step count.
    """
    cfg, t = ctx.cfg, ctx.cfg["train"]
    dev, bf16 = ctx.device, t["bf16"]
    data = phase_train_set(ctx, phase)
    world = dist.world_size()
    batch = max(1, t["batch_size"] // world)
    n_rank = len(data.y) if world == 1 else len(data.y) // world
    batches = math.ceil(n_rank / batch)
    accum = t["grad_accum"]
    steps_per_epoch = math.ceil(batches / accum)
    total_steps = phase.epochs * steps_per_epoch

    teacher_names = list(dict.fromkeys(n for s in phase.learners for n in s.teachers))
    teacher_models = {n: frozen_model(ctx, n) for n in teacher_names}
    teacher_paths: Dict[str, List[str]] = {n: [] for n in teacher_names}
    for s in phase.learners:
        for term in s.terms:
            for path in term.teacher_paths():
                teacher_paths[s.teachers[term.spec["teacher_index"]]].append(path)
    learners = [Learner(s, ctx, teacher_models, total_steps) for s in phase.learners]
    by_name = {l.spec.name: l for l in learners}
    teacher_taps = {n: FeatureTap(m, teacher_paths[n], "teacher") for n, m in teacher_models.items()}

    prune_at: Dict[int, float] = {}
    if any(l.compressed for l in learners) and cfg["student"]["prune_amount"] > 0:
        prune_at = compress.pruning_schedule(cfg["student"]["prune_amount"], phase.epochs, cfg["student"]["prune_epochs"])

    start_epoch, start_batch, opt_steps = 0, 0, 0
    torch.manual_seed(cfg["seed"] * 7919 + phase_index * 104_729 + dist.rank())
    if resume is not None:
        for l in learners:
            l.load(resume["learners"][l.spec.name])
        start_epoch, start_batch, opt_steps = resume["epoch"], resume["batch"], resume["opt_steps"]
        from fastkd.engine.checkpoint import set_rng_state

        set_rng_state(resume["rng"][dist.rank()])

    ref_cache: Dict[str, torch.Tensor] = {}

    def reference_log_probs(names: List[str]) -> Optional[torch.Tensor]:
        if not names:
            return None
        members = []
        for n in names:
            if n in by_name:  # a model of this phase, still changing
                members.append(predict_log_probs(by_name[n].model, ctx.val.x, dev, bf16))
            else:  # a finished model: computed once per phase
                if n not in ref_cache:
                    model = teacher_models[n] if n in teacher_models else frozen_model(ctx, n)
                    ref_cache[n] = predict_log_probs(model, ctx.val.x, dev, bf16)
                members.append(ref_cache[n])
        return members[0] if len(members) == 1 else metrics.ensemble_log_probs(members)

    def phase_state(epoch: int, next_batch: int) -> dict:
        return {
            "learners": {l.spec.name: l.state() for l in learners},
            "epoch": epoch,
            "batch": next_batch,
            "opt_steps": opt_steps,
            "rng": None,  # filled in by the job with every rank's RNG state
        }

    show = t["progress"] and dist.is_main()
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=phase.epochs * batches, initial=start_epoch * batches + start_batch, desc=phase.name,
                   unit="batch", file=sys.stderr, leave=False, dynamic_ncols=True)
    seen, t0 = 0, time.perf_counter()

    for epoch in range(start_epoch, phase.epochs):
        orders = [dist.shard(_epoch_order(cfg["seed"] + (0 if phase.shared_batches else 7 * j), phase_index, epoch, len(data.y)))
                  for j in range(1 if phase.shared_batches else len(learners))]
        if start_batch == 0 and epoch in prune_at:
            for l in learners:
                if l.compressed:
                    compress.prune_to(l.model, prune_at[epoch])
        for b in range(start_batch, batches):
            batches_xy = []
            for order in orders:
                idx = order[b * batch : (b + 1) * batch]
                xb = augment(data.x[idx], t["augment"], data.input_shape, t["augment_strength"]).to(dev)
                batches_xy.append((xb, data.y[idx].to(dev)))
            x, y = batches_xy[0]
            last_micro = (b + 1) % accum == 0 or b == batches - 1
            # Frozen teachers: eval mode, no_grad, once per batch for all learners.
            t_logits: Dict[str, torch.Tensor] = {}
            t_feats: Dict[str, Dict[str, torch.Tensor]] = {}
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                for n, m in teacher_models.items():
                    t_logits[n] = m(x).float()
                    t_feats[n] = teacher_taps[n].take()
            groups: Dict[tuple, TeacherOutputs] = {}
            with contextlib.ExitStack() as stack:
                if not last_micro:
                    for l in learners:
                        if l.wrapped is not l.module:
                            stack.enter_context(l.wrapped.no_sync())
                outs = {}
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                    for j, l in enumerate(learners):
                        outs[l.spec.name] = (l.wrapped(batches_xy[j % len(batches_xy)][0]), l.tap.take())
                total = 0.0
                for j, l in enumerate(learners):
                    logits, feats = outs[l.spec.name]
                    y = batches_xy[j % len(batches_xy)][1]
                    if l.spec.peers:
                        # Mutual learning: the other peers' current outputs, as constants.
                        teacher = TeacherOutputs([outs[p][0].detach().float() for p in l.spec.peers])
                    elif l.spec.teachers:
                        key = tuple(l.spec.teachers)
                        if key not in groups:
                            groups[key] = TeacherOutputs([t_logits[n] for n in key], [t_feats[n] for n in key])
                        teacher = groups[key]
                    else:
                        teacher = None
                    step = StepOutputs(logits, feats, y, teacher, l.regressors, epoch)
                    values = [term(step) for term in l.spec.terms]
                    loss = sum(term.weight * v for term, v in zip(l.spec.terms, values))
                    for k, v in enumerate(values):
                        l.term_sums[k] += float(v.detach()) * len(y)
                    l.loss_sum += float(loss.detach()) * len(y)
                    l.loss_count += len(y)
                    total = total + loss
                # Weight each micro-batch by its share of the accumulation window's samples, so
                # that accumulating equals one large batch even when the epoch's last batch is
                # short. One backward for all learners (their parameters are disjoint); fused
                # KD losses must not be backpropagated twice.
                first = b - b % accum
                window = sum(len(orders[0][i * batch : (i + 1) * batch]) for i in range(first, min(first + accum, batches)))
                (total * (len(y) / window)).backward()
            seen += len(y) * world
            if last_micro:
                for l in learners:
                    if t["grad_clip"] > 0:
                        torch.nn.utils.clip_grad_norm_(l.trainable_params(), t["grad_clip"])
                    l.optimizer.step()
                    l.scheduler.step()
                    l.optimizer.zero_grad(set_to_none=True)
                opt_steps += 1
                if t["checkpoint_every"] and opt_steps % t["checkpoint_every"] == 0:
                    ctx.save_checkpoint(phase_state(epoch, b + 1))
            if bar is not None:
                bar.update(1)
                if b % 5 == 0 or b == batches - 1:
                    running = np.mean([l.loss_sum / max(1, l.loss_count) for l in learners])
                    bar.set_postfix(loss=f"{running:.4f}", samples_s=f"{seen / (time.perf_counter() - t0):.0f}")
        start_batch = 0
        # End of epoch: evaluate every learner on the validation split.
        for l in learners:
            lp = predict_log_probs(l.model, ctx.val.x, dev, bf16)
            ref = reference_log_probs(l.spec.reference)
            line = {"phase": phase.name, "model": l.spec.name, "epoch": epoch + 1, "step": opt_steps, "split": "val",
                    "train_loss": l.loss_sum / max(1, l.loss_count), "terms": l.term_means()}
            line.update(metrics.classification_metrics(lp, ctx.val.y, ref))
            ctx.log(line)
            l.loss_sum, l.loss_count, l.term_sums = 0.0, 0, [0.0] * len(l.term_sums)
    if bar is not None:
        bar.close()
    for tap in teacher_taps.values():
        tap.remove()
    finished = {}
    for l in learners:
        l.tap.remove()
        if l.compressed:
            compress.finalize(l.model)
        finished[l.spec.name] = l.model.cpu().eval()
    return finished
