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

import torch
from torch import nn

from fastkd.data import Dataset
from fastkd.engine import compress, distributed as dist
from fastkd.engine.checkpoint import set_rng_state
from fastkd.engine.losses import FeatureTap, LossTerm, StepOutputs, TeacherOutputs
from fastkd.engine.models import get_module
from fastkd.engine.tasks import CACHED_TEACHER, Member, Task

# "No non-finite value yet" in the device-side divergence flags (a step number no run reaches).
NEVER = 1 << 62


class Diverged(Exception):
    """Non-finite values where training (or a teacher cache) needs finite ones: the work stops,
    and the CLI prints ``message`` as one line with exit status 3.

    Raised by a phase (:meth:`PhaseRun.guard`): ``model``, ``phase`` and ``step`` (the first
    optimizer step found bad, counted within the phase) say where; ``what`` is ``"loss"``,
    ``"grad"`` (the gradient norm at clipping) or ``"weights"`` (weights or optimizer state);
    ``others``: the phase's other models found bad. The job then words ``message`` (with
    ``reason``, what happened and what was kept, and ``lr``, the learning rate to continue with).
    """

    def __init__(self, message: str, *, model: str = "", phase: str = "", step: int = 0, what: str = "",
                 others: Optional[List[str]] = None):
        super().__init__(message)
        self.message = message
        self.model, self.phase, self.step, self.what, self.others = model, phase, step, what, list(others or [])
        self.reason, self.lr = message, None

    def __str__(self) -> str:
        return self.message


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
    # The position whose batch orders and random stream the phase takes (None: its own), so that
    # a plan without the teachers' phase still trains its students on the same batches.
    stream: Optional[int] = None


@dataclass
class Context:
    """What a phase needs from the job: config, task, data, device, the store of finished models
    (name -> ``{"role", "state"}``), a metrics sink and a checkpoint callback."""

    cfg: dict
    task: Task
    train: Dataset
    val: Dataset
    device: torch.device
    store: Dict[str, dict]
    log: Callable[[dict], None]
    save_checkpoint: Callable[[dict], None]


class LearnerModule(nn.Module):
    """A model and its regressors as one module, so that one DDP wrapper syncs both; its
    forward is the task's (for a language model, the body without ``lm_head``)."""

    def __init__(self, model: nn.Module, regressors: nn.ModuleDict, forward: Callable):
        super().__init__()
        self.model, self.regressors, self._forward = model, regressors, forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(self.model, x)


def frozen_model(ctx: Context, name: str) -> nn.Module:
    """A finished model from the store, in eval mode, without gradients (one the job did not
    train, ``state`` None, as the task builds it)."""
    entry = ctx.store[name]
    model = ctx.task.build(entry["role"], seed=0)
    if entry["state"] is not None:
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
    """A model being trained: the module, hooks, regressors, optimizer and LR schedule, and
    what its training steps cost (time, units seen, peak memory of one step)."""

    def __init__(self, spec: LearnerSpec, ctx: Context, teacher_models: Dict[str, nn.Module], total_steps: int):
        cfg, dev = ctx.cfg, ctx.device
        self.spec = spec
        role_cfg = cfg[spec.role]
        self.model = ctx.task.build(spec.role, spec.seed)
        if spec.init_from is not None:
            self.model.load_state_dict(ctx.store[spec.init_from]["state"])
        self.compressed = spec.compress and (role_cfg.get("prune_amount", 0) > 0 or role_cfg.get("quant_bits", 0) > 0)
        if self.compressed:
            compress.prepare(self.model, role_cfg)
        self.model.to(dev)
        self._set_trainable()
        self.tap = FeatureTap(self.model, [p for t in spec.terms for p in t.student_paths()], spec.role)
        self.regressors = self._make_regressors(ctx, teacher_models)
        self.module = LearnerModule(self.model, self.regressors, ctx.task.forward).to(dev)
        self.wrapped = dist.wrap(self.module, dev, shard=cfg["train"]["shard"], units=ctx.task.shard_units(self.model))
        params = [p for p in self.module.parameters() if p.requires_grad]
        t = cfg["train"]
        if t["optimizer"] == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
        else:
            self.optimizer = torch.optim.SGD(params, lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(t, total_steps))
        # Unit-weighted sums of the loss (entry 0) and of each term since the last log line, kept
        # on the device and read only at log points: reading them per micro-batch would make
        # the host wait for the device at every step. ``loss_count`` (the units) is known on the host.
        self.sums = torch.zeros(1 + len(spec.terms), dtype=torch.float64, device=dev)
        self.loss_count = 0
        # Seconds spent in this learner's forward, loss, backward and optimizer step, the units
        # (samples or tokens) they covered, and the peak memory of one profiled step.
        self.cost = {"seconds": 0.0, "units": 0, "peak_mb": None}
        self.clock = StepClock(dev)

    def add_loss(self, loss: torch.Tensor, values: List[torch.Tensor], units: int) -> None:
        """Adds one micro-batch's loss and term values, weighted by its ``units``, without a
        host synchronisation."""
        self.sums += torch.stack([v.detach().double() for v in (loss, *values)]) * units
        self.loss_count += units

    def take_means(self) -> tuple:
        """The mean loss and the mean of each term (keyed ``<kind><index>``) since the last
        call, and a fresh start: one host synchronisation."""
        means = (self.sums / max(1, self.loss_count)).tolist()
        self.sums.zero_()
        self.loss_count = 0
        return means[0], {f"{t.KIND}{t.index}": m for t, m in zip(self.spec.terms, means[1:])}

    def settled_cost(self) -> dict:
        self.cost["seconds"] += self.clock.take()
        return dict(self.cost)

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
        sums = self.sums.tolist()
        return {
            "module": dist.full_state_dict(self.wrapped, self.module),
            "optimizer": dist.full_optimizer_state_dict(self.wrapped, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "loss": [sums[0], self.loss_count, sums[1:]],
            "cost": self.settled_cost(),
        }

    def load(self, state: dict, lr: float) -> None:
        """Restore a checkpointed state, continuing its schedule from base learning rate ``lr``
        (``train.lr`` is one of the settings a resumed run may change)."""
        dist.load_full_state_dict(self.wrapped, self.module, state["module"])
        dist.load_full_optimizer_state_dict(self.wrapped, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        loss_sum, self.loss_count, term_sums = state["loss"]
        self.sums = torch.tensor([loss_sum, *term_sums], dtype=torch.float64, device=self.sums.device)
        self.cost = dict(state["cost"])
        s = self.scheduler
        if any(b != lr for b in s.base_lrs):
            # The saved optimizer and scheduler carry the old rate: rescale both to the new
            # one at the schedule's position (what LambdaLR itself computes at each step).
            s.base_lrs = [lr] * len(s.base_lrs)
            for group, factor in zip(self.optimizer.param_groups, s.lr_lambdas):
                group["initial_lr"], group["lr"] = lr, lr * factor(s.last_epoch)
            s._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def trainable_params(self) -> List[torch.Tensor]:
        return [p for p in self.module.parameters() if p.requires_grad]


class StepClock:
    """Seconds of a learner's work, timed without making the host wait for the device: on a
    CUDA device by a pair of events around each timed block (in stream order, so the span the
    device took to reach the end from the start), read once they have completed; on the CPU,
    where ops run as they are called, by the wall clock. :meth:`take` waits for what is still
    pending (call it where the loop synchronises anyway: a log line, a checkpoint, the end)."""

    def __init__(self, device: torch.device):
        self.events = device.type == "cuda"
        self._seconds = 0.0
        self._pending: List[tuple] = []

    @contextlib.contextmanager
    def __call__(self):
        if not self.events:
            started = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - started
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._pending.append((start, end))
        # Fold in the pairs the device has finished (query() does not wait): the list stays short.
        while self._pending and self._pending[0][1].query():
            self._fold(self._pending.pop(0))

    def _fold(self, pair: tuple) -> None:
        start, end = pair
        end.synchronize()
        self._seconds += start.elapsed_time(end) / 1e3

    def take(self) -> float:
        """The seconds timed since the last call."""
        for pair in self._pending:
            self._fold(pair)
        self._pending, seconds, self._seconds = [], self._seconds, 0.0
        return seconds


def _epoch_order(seed: int, phase_index: int, epoch: int, n: int) -> torch.Tensor:
    # Each epoch's order depends only on (seed, phase, epoch): a resumed run sees the same batches.
    g = torch.Generator().manual_seed(seed * 1_000_003 + phase_index * 10_007 + epoch)
    return torch.randperm(n, generator=g)


class PhaseRun:
    """One phase in progress: its learners, frozen teachers and position. :func:`run_phase`
    drives it; the task (``ctx.task``) decides what a batch is, what the loss terms see of a
    model's output and what the evaluation measures."""

    def __init__(self, ctx: Context, phase_index: int, phase: Phase, resume: Optional[dict]):
        cfg, t = ctx.cfg, ctx.cfg["train"]
        self.ctx, self.task, self.phase = ctx, ctx.task, phase
        self.index = phase_index if phase.stream is None else phase.stream
        self.dev, self.bf16 = ctx.device, t["bf16"]
        self.data = ctx.task.subset(ctx.train, phase.fraction, cfg["seed"])
        world = dist.world_size()
        self.batch = max(1, t["batch_size"] // world)
        n_rank = len(self.data.y) if world == 1 else len(self.data.y) // world
        self.batches = math.ceil(n_rank / self.batch)
        self.accum = t["grad_accum"]
        total_steps = phase.epochs * math.ceil(self.batches / self.accum)

        names = list(dict.fromkeys(n for s in phase.learners for n in s.teachers if n != CACHED_TEACHER))
        self.cached = any(CACHED_TEACHER in s.teachers for s in phase.learners)
        self.teacher_models = {n: frozen_model(ctx, n) for n in names}
        paths: Dict[str, List[str]] = {n: [] for n in names}
        for s in phase.learners:
            for term in s.terms:
                for path in term.teacher_paths():
                    paths[s.teachers[term.spec["teacher_index"]]].append(path)
        self.learners = [Learner(s, ctx, self.teacher_models, total_steps) for s in phase.learners]
        self.by_name = {l.spec.name: l for l in self.learners}
        self.teacher_taps = {n: FeatureTap(m, paths[n], "teacher") for n, m in self.teacher_models.items()}
        self.prune_at: Dict[int, float] = {}
        if any(l.compressed for l in self.learners) and cfg["student"]["prune_amount"] > 0:
            self.prune_at = compress.pruning_schedule(cfg["student"]["prune_amount"], phase.epochs, cfg["student"]["prune_epochs"])
        self.eval_cache: dict = {}  # predictions of finished models on the validation split

        self.start_epoch, self.start_batch, self.opt_steps = 0, 0, 0
        torch.manual_seed(cfg["seed"] * 7919 + phase_index * 104_729 + dist.rank())
        if resume is not None:
            for l in self.learners:
                l.load(resume["learners"][l.spec.name], t["lr"])
            self.start_epoch, self.start_batch, self.opt_steps = resume["epoch"], resume["batch"], resume["opt_steps"]
            set_rng_state(resume["rng"][dist.rank()])
        # Divergence is watched on the device: per learner, the first optimizer step whose loss
        # (column 0) or clipped gradient norm (column 1) was not finite, read only by guard(),
        # where the loop synchronises anyway (validation, checkpoints), so that watching costs
        # no host round trip per step.
        self.step_t = torch.tensor(self.opt_steps, device=self.dev)
        self.first_bad = torch.full((len(self.learners), 2), NEVER, dtype=torch.int64, device=self.dev)

    def state(self, epoch: int, next_batch: int) -> dict:
        return {
            "learners": {l.spec.name: l.state() for l in self.learners},
            "epoch": epoch,
            "batch": next_batch,
            "opt_steps": self.opt_steps,
            "rng": None,  # filled in by the job with every rank's RNG state
        }

    def flag(self, j: int, column: int, value: torch.Tensor) -> None:
        """Record (on the device, no synchronisation) that learner ``j``'s ``value`` is not
        finite at the optimizer step in progress, unless an earlier step was already."""
        value = value.detach()
        if hasattr(value, "full_tensor"):  # a sharded model's gradient norm is a DTensor
            value = value.full_tensor()
        cell = self.first_bad[j, column]
        self.first_bad[j, column] = torch.where(torch.isfinite(value).all(), cell, torch.minimum(cell, self.step_t + 1))

    def guard(self, optimizer_state: bool = False) -> None:
        """Raise :class:`Diverged` if a learner's loss or clipped gradient norm was not finite
        at some step so far, or its weights (with ``optimizer_state``: its optimizer's state
        too, before a checkpoint) are not finite now. One host synchronisation, and a
        collective: every rank takes the same decision."""
        rows = []
        for l in self.learners:
            tensors = list(l.module.parameters()) + list(l.module.buffers())
            if optimizer_state:
                tensors += [v for st in l.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
            # A sharded model checks its own shard; the reduction below combines the ranks.
            tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
            checks = [torch.isfinite(t.detach()).all() for t in tensors if t.is_floating_point() and t.device == self.step_t.device]
            finite = torch.stack(checks).all() if checks else torch.ones((), dtype=torch.bool, device=self.dev)
            rows.append(torch.where(finite, NEVER, self.step_t))
        flags = dist.all_reduce_min(torch.cat([self.first_bad, torch.stack(rows).unsqueeze(1)], 1)).tolist()
        found = []
        for l, row in zip(self.learners, flags):
            column = min(range(3), key=lambda c: (row[c], c))
            if row[column] < NEVER:
                found.append((row[column], column, l.spec.name))
        if found:
            found.sort()
            step, column, name = found[0]
            what = ("loss", "grad", "weights")[column]
            raise Diverged(f"{name} diverged at optimizer step {step} of phase {self.phase.name!r} ({what})", model=name,
                           phase=self.phase.name, step=int(step), what=what, others=[n for _, _, n in found[1:]])

    def orders(self, epoch: int) -> List[torch.Tensor]:
        phase, seed = self.phase, self.ctx.cfg["seed"]
        count = 1 if phase.shared_batches else len(self.learners)
        return [dist.shard(_epoch_order(seed + (0 if phase.shared_batches else 7 * j), self.index, epoch, len(self.data.y)))
                for j in range(count)]

    def teacher_outputs(self, x: torch.Tensor, y: torch.Tensor, samples: torch.Tensor) -> Dict[str, tuple]:
        """Frozen teachers: eval mode, no_grad, once per batch for all learners. Per teacher,
        the task's view of its output and its captured features; a cached teacher's rows of the
        batch's ``samples``."""
        out = {}
        if self.cached:
            t = self.task.cached_teacher(samples)
            t.indices, t.values = t.indices.to(self.dev), t.values.to(self.dev)
            out[CACHED_TEACHER] = (t, {})
        with torch.no_grad(), torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            for n, m in self.teacher_models.items():
                view = self.task.view(m, self.task.forward(m, x), y)
                if view.logits is not None:
                    view.logits = view.logits.float()
                out[n] = (view, self.teacher_taps[n].take())
        return out

    def teacher_for(self, l: Learner, teachers: Dict[str, tuple], outs: Dict[str, tuple], groups: dict) -> Optional[TeacherOutputs]:
        if l.spec.peers:
            # Mutual learning: the other peers' current outputs, as constants.
            return TeacherOutputs([outs[p][0].logits.detach().float() for p in l.spec.peers])
        if not l.spec.teachers:
            return None
        key = tuple(l.spec.teachers)
        if key == (CACHED_TEACHER,):
            return TeacherOutputs(sparse=teachers[CACHED_TEACHER][0])
        if key not in groups:
            views = [teachers[n][0] for n in key]
            feats = [teachers[n][1] for n in key]
            if views[0].logits is not None:
                groups[key] = TeacherOutputs([v.logits for v in views], feats)
            else:
                groups[key] = TeacherOutputs(None, feats, hidden=[v.hidden for v in views], heads=[v.head for v in views],
                                             softcaps=[v.softcap for v in views])
        return groups[key]

    def forward(self, l: Learner, x: torch.Tensor, y: torch.Tensor) -> tuple:
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = l.wrapped(x)
        return self.task.view(l.model, out, y), l.tap.take()

    def learner_loss(self, l: Learner, view, feats, teacher: Optional[TeacherOutputs], epoch: int, units: int) -> torch.Tensor:
        step = StepOutputs(view.logits, feats, view.labels, teacher, l.regressors, epoch,
                           hidden=view.hidden, head=view.head, masked=view.masked, softcap=view.softcap)
        values = [term(step) for term in l.spec.terms]
        loss = sum(term.weight * v for term, v in zip(l.spec.terms, values))
        l.add_loss(loss, values, units)
        return loss

    def train_batch(self, epoch: int, b: int, orders: List[torch.Tensor], profile: bool) -> int:
        """One micro-batch for every learner (an optimizer step at the end of an accumulation
        window); returns the units (samples or tokens) of the batch on this rank."""
        t = self.ctx.cfg["train"]
        batch = self.batch
        xy, units = [], []
        for order in orders:
            x, y = self.task.batch(self.data, order[b * batch : (b + 1) * batch])
            units.append(self.task.units(y))  # counted on the host copy: no device synchronisation
            xy.append((x.to(self.dev), y.to(self.dev)))
        x, y = xy[0]
        last_micro = (b + 1) % self.accum == 0 or b == self.batches - 1
        # Weight each micro-batch by its share of the accumulation window's units, so that
        # accumulating equals one large batch even when the epoch's last batch is short.
        first = b - b % self.accum
        window = sum(self.task.units(self.data.y[orders[0][i * batch : (i + 1) * batch]])
                     for i in range(first, min(first + self.accum, self.batches)))
        teachers = self.teacher_outputs(x, y, orders[0][b * batch : (b + 1) * batch]) if self.teacher_models or self.cached else {}
        groups: Dict[tuple, TeacherOutputs] = {}
        mutual = any(l.spec.peers for l in self.learners)
        with contextlib.ExitStack() as stack:
            if not last_micro:
                for l in self.learners:
                    stack.enter_context(dist.no_sync(l.wrapped))
            outs: Dict[str, tuple] = {}
            if mutual:  # peers read each other's outputs of this batch: all forwards first
                for j, l in enumerate(self.learners):
                    outs[l.spec.name] = self.forward(l, *xy[j % len(xy)])
            for j, l in enumerate(self.learners):
                lx, ly = xy[j % len(xy)]
                lunits = units[j % len(units)]
                with _cost(l, self.dev, profile, lunits):
                    if l.spec.name not in outs:
                        outs[l.spec.name] = self.forward(l, lx, ly)
                    view, feats = outs[l.spec.name]
                    loss = self.learner_loss(l, view, feats, self.teacher_for(l, teachers, outs, groups), epoch, lunits)
                    self.flag(j, 0, loss)
                    # One backward per learner (their parameters are disjoint, and a fused KD
                    # loss must not be backpropagated twice).
                    (loss * (lunits / window)).backward()
                if not mutual:
                    del outs[l.spec.name]  # its activations are freed before the next learner runs
        if last_micro:
            for j, l in enumerate(self.learners):
                with l.clock():
                    if t["grad_clip"] > 0:
                        self.flag(j, 1, dist.clip_grad_norm(l.wrapped, l.trainable_params(), t["grad_clip"]))
                    l.optimizer.step()
                    l.scheduler.step()
                    l.optimizer.zero_grad(set_to_none=True)
            self.opt_steps += 1
            self.step_t += 1
            # Before the checkpoint, so that a run resumed from it does not lose the line.
            if t["eval_every"] and self.opt_steps % t["eval_every"] == 0 and b != self.batches - 1:
                self.guard()
                self.validate(epoch)
            if t["checkpoint_every"] and self.opt_steps % t["checkpoint_every"] == 0:
                self.guard(optimizer_state=True)  # a checkpoint never holds a diverged model
                self.ctx.save_checkpoint(self.state(epoch, b + 1))
        return units[0]

    def validate(self, epoch: int) -> None:
        """Every learner on the validation split, logged as one line each (at the end of an
        epoch and every ``train.eval_every`` optimizer steps); ``train_loss`` is the mean since
        the previous line."""
        for l in self.learners:
            reference = None
            if l.spec.reference:
                reference = [Member(n, lambda n=n: self.by_name[n].model, False) if n in self.by_name
                             else Member(n, lambda n=n: self.teacher_models.get(n) or frozen_model(self.ctx, n))
                             for n in l.spec.reference]
            with contextlib.ExitStack() as stack:
                for other in self.learners:
                    stack.enter_context(dist.gathered(other.wrapped))
                m = self.task.evaluate(self.ctx.val, [Member(l.spec.name, lambda l=l: l.model, False)], reference,
                                       self.eval_cache)
            train_loss, terms = l.take_means()
            line = {"phase": self.phase.name, "model": l.spec.name, "epoch": epoch + 1, "step": self.opt_steps, "split": "val",
                    "train_loss": train_loss, "terms": terms}
            line.update(m)
            self.ctx.log(line)

    def finish(self) -> tuple:
        for tap in self.teacher_taps.values():
            tap.remove()
        finished = {}
        for l in self.learners:
            l.tap.remove()
            if l.compressed:
                compress.finalize(l.model)
            finished[l.spec.name] = dist.unwrap_model(l.wrapped, l.module, lambda l=l: self.task.build(l.spec.role, 0)).cpu().eval()
        return finished, {l.spec.name: l.settled_cost() for l in self.learners}


@contextlib.contextmanager
def _cost(l: Learner, device: torch.device, profile: bool, units: int):
    """Time a learner's share of a step; with ``profile``, also its peak memory (the first
    step measured per learner: on CUDA the allocator's peak, on the CPU the profiler's
    allocation trace), that step's time left out."""
    if profile and l.cost["peak_mb"] is None:
        from fastkd.engine.memory import peak_memory_mb

        with peak_memory_mb(device) as peak:
            yield
        l.cost["peak_mb"] = round(peak.value, 2)
        return
    with l.clock():
        yield
    l.cost["units"] += units


def run_phase(ctx: Context, phase_index: int, phase: Phase, resume: Optional[dict] = None) -> tuple:
    """Train ``phase`` to its end; returns its trained models by name (compression baked in)
    and, by name, what training each cost (seconds, units, peak MiB of one step).

    ``resume`` is the ``"phase_state"`` of a checkpoint taken inside this phase: learner states,
    RNG states, position (epoch, next batch) and optimizer-step count.
    """
    run = PhaseRun(ctx, phase_index, phase, resume)
    t = ctx.cfg["train"]
    bar = None
    if t["progress"] and dist.is_main():
        from tqdm import tqdm

        bar = tqdm(total=phase.epochs * run.batches, initial=run.start_epoch * run.batches + run.start_batch,
                   desc=phase.name, unit="batch", file=sys.stderr, leave=False, dynamic_ncols=True)
    seen, t0 = 0, time.perf_counter()
    start_batch = run.start_batch
    try:
        for epoch in range(run.start_epoch, phase.epochs):
            orders = run.orders(epoch)
            if start_batch == 0 and epoch in run.prune_at:
                for l in run.learners:
                    if l.compressed:
                        compress.prune_to(l.model, run.prune_at[epoch])
            for b in range(start_batch, run.batches):
                # The second batch a process runs is profiled: the first pays one-time costs.
                seen += run.train_batch(epoch, b, orders, profile=t["measure_memory"] and b == start_batch + 1) * dist.world_size()
                if bar is not None:
                    bar.update(1)
                    # The bar's loss is a log point: read from the device every 20 batches only.
                    if b % 20 == 0 or b == run.batches - 1:
                        running = float(torch.stack([l.sums[0] / max(1, l.loss_count) for l in run.learners]).mean())
                        bar.set_postfix(loss=f"{running:.4f}", **{f"{ctx.task.UNIT}_s": f"{seen / (time.perf_counter() - t0):.0f}"})
            start_batch = 0
            run.guard()  # also what the phase hands on: the last epoch's check covers its end
            run.validate(epoch)
    finally:
        if bar is not None:
            bar.close()
    return run.finish()
