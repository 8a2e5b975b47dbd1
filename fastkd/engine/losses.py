"""Loss terms: the pieces whose weighted sum trains a student.

A term is a class registered with :func:`register_loss_term` under the ``kind`` a config names
(``[[loss]] kind = "kd"``). It declares its config keys (``SCHEMA``, checked by
:mod:`fastkd.engine.config`), the modules whose outputs it needs (``student_paths`` /
``teacher_paths``, captured by forward hooks, so models are used unchanged), may create a
learnable regressor, and computes its value from a :class:`StepOutputs`. A fused loss that lands
in fastkd later plugs in as one more registered term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import fastkd
from fastkd.engine.schema import ConfigError, Field
from fastkd.ops import divergences, table
from fastkd.ops.feature import HINT_KINDS
from fastkd.ops.fused_linear import softcapped

LOSS_TERMS: Dict[str, type] = {}


def register_loss_term(kind: str) -> Callable[[type], type]:
    """Class decorator: make a :class:`LossTerm` subclass available as ``[[loss]] kind = ...``."""

    def deco(cls: type) -> type:
        cls.KIND = kind
        LOSS_TERMS[kind] = cls
        return cls

    return deco


# ----------------------------------------------------------------------------------------------
# What a term sees
# ----------------------------------------------------------------------------------------------


@dataclass
class SparseTeacher:
    """A teacher known at K entries per row, read from a teacher cache
    (:mod:`fastkd.teacher_cache`): ``indices`` and ``values`` ``[N, K]`` aligned with the
    student's rows, the values' kind and the tail that reads them as written (``sparse_kd_loss``'s
    ``values`` and ``tail``)."""

    indices: torch.Tensor
    values: torch.Tensor
    kind: str
    tail: str


class TeacherOutputs:
    """The frozen teachers' outputs on one batch, computed once and shared by every student.

    Per ensemble member either its ``logits`` ``[N, V]`` (float32, no grad) or, where the task
    splits the output layer off (language models), its ``hidden`` states ``[N, H]`` and output
    layer ``heads``, from which the logits are formed only when a term asks for them (a fused
    head never does), soft-capped at the member's ``softcaps`` entry where it has one (Gemma's
    ``final_logit_softcapping``); ``features``: per member, module path -> captured output. A
    teacher read from a cache is ``sparse`` alone: no logits exist, and only the KD term reads it.
    """

    def __init__(self, logits: Optional[List[torch.Tensor]] = None, features: Optional[List[Dict[str, torch.Tensor]]] = None,
                 hidden: Optional[List[torch.Tensor]] = None, heads: Optional[List[nn.Module]] = None,
                 sparse: Optional[SparseTeacher] = None, softcaps: Optional[List[Optional[float]]] = None):
        self._logits, self.features = logits, features or []
        self.hidden, self.heads, self.sparse = hidden, heads, sparse
        self.softcaps = softcaps or [None] * len(hidden or [])
        self._stacked: Optional[torch.Tensor] = None
        self._combined: Dict[float, torch.Tensor] = {}

    @property
    def count(self) -> int:
        if self.sparse is not None:
            return 1
        return len(self._logits if self._logits is not None else self.hidden)

    @property
    def logits(self) -> List[torch.Tensor]:
        if self.sparse is not None:
            raise RuntimeError("the teacher is read from a top-K cache: it has no logits (only kind 'kd' reads it)")
        if self._logits is None:
            with torch.no_grad():
                self._logits = [softcapped(head(h).float(), cap) for h, head, cap in zip(self.hidden, self.heads, self.softcaps)]
        return self._logits

    def ensemble(self) -> torch.Tensor:
        """The teacher as :func:`fastkd.kd_loss` takes it: a single member's ``[B, V]`` logits, or
        the members stacked ``[M, B, V]``, which kd_loss distils from as the mixture of their
        probabilities (``mean_m softmax(t_m / T)``) in its fused pass, never forming the mixture.
        Stacked once per batch, so several students and terms share it."""
        if len(self.logits) == 1:
            return self.logits[0]
        if self._stacked is None:
            self._stacked = torch.stack(self.logits)
        return self._stacked

    def combined(self, temperature: float) -> torch.Tensor:
        """Logits whose softmax at ``temperature`` is the members' averaged probabilities,
        ``T * log(mean_m softmax(t_m / T))`` (a single member's logits as they are): for losses
        without a fused ensemble path (DKD splits the teacher at the label, which a mixture's
        logits give directly). Cached per temperature, so several students and terms share it."""
        if len(self.logits) == 1:
            return self.logits[0]
        if temperature not in self._combined:
            logp = torch.stack([F.log_softmax(t.float() / temperature, dim=-1) for t in self.logits])
            self._combined[temperature] = temperature * (torch.logsumexp(logp, dim=0) - math.log(len(self.logits)))
        return self._combined[temperature]


class StepOutputs:
    """One student's view of a batch: its logits ``[N, V]`` (with grad), its captured
    features, the labels ``[N]``, the teacher outputs (or None), its regressors, and the
    phase's epoch (counted from 0; for terms with a schedule, such as DKD's warm-up).

    A task that splits the output layer off gives ``hidden`` ``[N, H]`` and ``head`` instead of
    logits; ``logits`` are then formed on first use (a fused head reads ``hidden`` and never
    asks), soft-capped at ``softcap`` when the model has one (its
    ``config.final_logit_softcapping``, as Gemma 2/3 apply it). ``masked`` says that labels may
    hold ``IGNORE_INDEX`` rows (padding), which every term must leave out."""

    def __init__(self, logits: Optional[torch.Tensor], features: Dict[str, torch.Tensor], labels: torch.Tensor,
                 teacher: Optional[TeacherOutputs], regressors: nn.ModuleDict, epoch: int = 0, *,
                 hidden: Optional[torch.Tensor] = None, head: Optional[nn.Module] = None, masked: bool = False,
                 softcap: Optional[float] = None):
        self._logits, self.features, self.labels, self.teacher = logits, features, labels, teacher
        self.regressors, self.epoch, self.hidden, self.head, self.masked = regressors, epoch, hidden, head, masked
        self.softcap = softcap

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = softcapped(self.head(self.hidden), self.softcap)
        return self._logits


IGNORE_INDEX = -100


class LossTerm:
    """Base class. ``spec`` is the validated ``[[loss]]`` table (``weight`` always present)."""

    KIND = ""
    SCHEMA: Dict[str, Field] = {}
    needs_teacher = False

    def __init__(self, spec: dict, index: int):
        self.spec, self.index, self.weight = spec, index, spec["weight"]

    @classmethod
    def build(cls, spec: dict, index: int, cached_teacher: bool = False) -> "LossTerm":
        """The term for one validated table (a kind with several cases picks one here)."""
        return cls(spec, index)

    @classmethod
    def validate(cls, spec: dict, where: str) -> None:
        """Cross-key checks of one table; raise :class:`ConfigError`."""

    def student_paths(self) -> List[str]:
        return []

    def teacher_paths(self) -> List[str]:
        return []

    def make_regressor(self, student_feats: Dict[str, torch.Tensor], teacher_feats: Dict[str, torch.Tensor]) -> Optional[nn.Module]:
        """A learnable module mapping the student's feature to the teacher's shape, or None."""
        return None

    def __call__(self, out: StepOutputs) -> torch.Tensor:
        raise NotImplementedError


@register_loss_term("kd")
class KDTerm(LossTerm):
    """``[[loss]] kind = "kd"``: temperature KD against the teacher, in one of three cases, each
    its own class below, chosen once when the term is built (:meth:`build`):

    * :class:`DenseKD`: :func:`fastkd.kd_loss` on the student's logits, against one teacher's
      logits or an ensemble's (the members' logits go in as ``[M, B, V]``, and kd_loss distils
      from the mixture of their probabilities);
    * :class:`FusedHeadKD` (``fused_head = true``): :func:`fastkd.fused_linear_kd_loss` through
      the output layers, so that the batch's logits never exist;
    * :class:`CachedTeacherKD` (a job with ``teacher.cache``): :func:`fastkd.sparse_kd_loss`
      against the teacher's K cached entries per row, or with ``fused_head = true``
      :func:`fastkd.fused_linear_sparse_kd_loss` through the student's output layer.

    ``divergence`` and ``beta`` are kd_loss's (``beta = -1``: the divergence's default);
    ``hard_weight > 0`` fuses the cross-entropy with the labels into the same pass."""

    SCHEMA = {
        "weight": Field("float", 1.0, lo=0.0),
        "temperature": Field("float", 4.0, lo=0.0, lo_open=True),
        "hard_weight": Field("float", 0.0, lo=0.0, hi=1.0),
        "t2_scale": Field("bool", True),
        "divergence": Field("str", "kl", choices=tuple(divergences.DIVERGENCES), doc="fastkd.kd_loss's divergence"),
        "beta": Field("float", -1.0, doc="the divergence's beta (jsd, skew_kl, skew_reverse_kl); -1: its default"),
        "fused_head": Field("bool", False, doc="distil through the output layers without materialising logits"),
        "student_head": Field("str", "", doc="module path of the student's output layer (fused_head)"),
        "teacher_head": Field("str", "", doc="module path of the teacher's output layer (fused_head)"),
        "teacher_index": Field("int", 0, lo=0, doc="the teacher whose head fused_head reads"),
        "chunk_size": Field("int", 0, lo=0, doc="fused_head: rows per chunk (0: the op's choice, sized for a GPU: "
                            "up to 256 MiB of [rows, V] buffers)"),
        "tail": Field("str", "", choices=("", "renormalize", "uniform"),
                      doc="teacher.cache: sparse_kd_loss's tail (empty: uniform for top-k log-probabilities, else renormalize)"),
        "values": Field("str", "", choices=("", "logprobs", "logits"),
                        doc="teacher.cache: what the cached values are taken as (empty: as the cache says)"),
    }
    needs_teacher = True

    @classmethod
    def validate(cls, spec: dict, where: str) -> None:
        try:
            divergences.check(spec["divergence"], cls._beta(spec))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if bool(spec.get("student_head")) != bool(spec.get("teacher_head")):
            raise ConfigError(f"{where}.student_head and {where}.teacher_head are named together or not at all")

    @classmethod
    def build(cls, spec: dict, index: int, cached_teacher: bool = False) -> "KDTerm":
        if cached_teacher:
            return CachedTeacherKD(spec, index)
        return (FusedHeadKD if spec["fused_head"] else DenseKD)(spec, index)

    @staticmethod
    def _beta(spec: dict) -> Optional[float]:
        return None if spec["beta"] == -1.0 else spec["beta"]

    def common_kwargs(self, out: StepOutputs) -> dict:
        """What every case passes its op: the cross-entropy's weight and labels (also given
        whenever rows may be padding, which the ops then leave out) and the T² scale."""
        kwargs = dict(hard_weight=self.spec["hard_weight"], t2_scale=self.spec["t2_scale"])
        if self.spec["hard_weight"] > 0 or out.masked:
            kwargs["labels"] = out.labels
        return kwargs

    def chunk_size(self) -> Optional[int]:
        return self.spec.get("chunk_size") or None

    def divergence_kwargs(self) -> dict:
        if self.spec["divergence"] == "kl":
            return {}
        return dict(divergence=self.spec["divergence"], beta=self._beta(self.spec))


class DenseKD(KDTerm):
    """KD on the student's logits against the teacher's (or the ensemble's stacked) logits."""

    def __call__(self, out: StepOutputs) -> torch.Tensor:
        # The teacher stays float32 whatever the student's dtype: the kernels read mixed dtypes.
        return fastkd.kd_loss(out.logits, out.teacher.ensemble(), self.spec["temperature"], **self.common_kwargs(out),
                              **self.divergence_kwargs())


class FusedHeadKD(KDTerm):
    """KD through the output layers with :func:`fastkd.fused_linear_kd_loss` (any divergence):
    the loss never holds the batch's logits. The hidden states and output layers are the task's
    where it splits the output layer off (a language model's ``lm_head``: ``student_head`` and
    ``teacher_head`` stay empty); otherwise the inputs of the modules those two keys name (an
    ``nn.Linear`` each), captured by forward hooks. One teacher only: an ensemble's mixture is
    defined on probabilities, not on one output layer."""

    def _tapped(self) -> bool:
        return bool(self.spec.get("student_head"))

    def student_paths(self) -> List[str]:
        return [INPUT_OF + self.spec["student_head"]] if self._tapped() else []

    def teacher_paths(self) -> List[str]:
        return [INPUT_OF + self.spec["teacher_head"]] if self._tapped() else []

    def __call__(self, out: StepOutputs) -> torch.Tensor:
        if out.teacher.count != 1:
            raise ConfigError(f"loss.{self.index}.fused_head needs one teacher, the run has {out.teacher.count}")
        k = self.spec["teacher_index"]
        caps = {}
        if self._tapped():
            h_s, head_s = out.features[INPUT_OF + self.spec["student_head"]]
            h_t, head_t = out.teacher.features[k][INPUT_OF + self.spec["teacher_head"]]
        else:
            h_s, head_s = out.hidden, out.head
            h_t, head_t = out.teacher.hidden[k], out.teacher.heads[k]
            caps = dict(student_softcap=out.softcap, teacher_softcap=out.teacher.softcaps[k])
        return fastkd.fused_linear_kd_loss(
            h_s, head_s.weight, h_t, head_t.weight, self.spec["temperature"], student_bias=head_s.bias,
            teacher_bias=head_t.bias, chunk_size=self.chunk_size(), **caps, **self.common_kwargs(out),
            **self.divergence_kwargs(),
        )


class CachedTeacherKD(KDTerm):
    """KD against a teacher read from a cache (``teacher.cache``), known at K entries per row,
    with the cache's ``values`` and the ``tail`` that reads them as written, unless the term's
    ``tail``/``values`` say otherwise; the divergence is KL. With ``fused_head = true``,
    :func:`fastkd.fused_linear_sparse_kd_loss` through the student's output layer (soft-capped as
    its model's config says), so that the step holds neither a teacher nor the batch's
    ``[tokens, V]`` logits; else :func:`fastkd.sparse_kd_loss` on the student's logits."""

    def __call__(self, out: StepOutputs) -> torch.Tensor:
        sparse = out.teacher.sparse
        kwargs = dict(values=self.spec["values"] or sparse.kind, tail=self.spec["tail"] or sparse.tail, **self.common_kwargs(out))
        if self.spec["fused_head"]:
            return fastkd.fused_linear_sparse_kd_loss(out.hidden, out.head.weight, sparse.values, sparse.indices, self.spec["temperature"],
                                                      student_bias=out.head.bias, student_softcap=out.softcap,
                                                      chunk_size=self.chunk_size(), **kwargs)
        return fastkd.sparse_kd_loss(out.logits, sparse.values, sparse.indices, self.spec["temperature"], **kwargs)


@register_loss_term("dkd")
class DKDTerm(LossTerm):
    """Decoupled KD (Zhao et al. 2022) with fastkd's fused :func:`fastkd.dkd_loss` against the
    teacher (ensemble) output and the labels, with mdistiller's linear warm-up: the term is
    ``min(epoch / warmup_epochs, 1) * dkd_loss(...)`` with epochs counted from 1, as in
    mdistiller (and in the metrics log), so the first epoch already trains at
    ``1 / warmup_epochs``; ``warmup_epochs = 0`` turns the warm-up off. mdistiller adds
    cross-entropy as a separate term: ``[[loss]] kind = "ce"`` beside this one."""

    SCHEMA = {
        "weight": Field("float", 1.0, lo=0.0),
        "temperature": Field("float", 4.0, lo=0.0, lo_open=True),
        "alpha": Field("float", 1.0, lo=0.0, doc="TCKD weight"),
        "beta": Field("float", 8.0, lo=0.0, doc="NCKD weight (mdistiller: 8 on CIFAR-100, 0.5 on ImageNet)"),
        "warmup_epochs": Field("int", 20, lo=0, doc="epochs of linear warm-up of the DKD weight (0: none)"),
    }
    needs_teacher = True

    @classmethod
    def validate(cls, spec: dict, where: str) -> None:
        for key in ("temperature", "alpha", "beta"):
            if not math.isfinite(spec[key]):
                raise ConfigError(f"{where}.{key} must be finite, got {spec[key]!r}")

    def warmup_factor(self, epoch: int) -> float:
        """The DKD weight in the phase's epoch ``epoch`` (counted from 0)."""
        warmup = self.spec["warmup_epochs"]
        return 1.0 if warmup == 0 else min((epoch + 1) / warmup, 1.0)

    def __call__(self, out: StepOutputs) -> torch.Tensor:
        t = self.spec["temperature"]
        loss = fastkd.dkd_loss(
            out.logits, out.teacher.combined(t).to(out.logits.dtype), out.labels, t,
            alpha=self.spec["alpha"], beta=self.spec["beta"],
        )
        return self.warmup_factor(out.epoch) * loss


@register_loss_term("ce")
class CETerm(LossTerm):
    """Cross-entropy with the (possibly noisy) training labels."""

    SCHEMA = {"weight": Field("float", 1.0, lo=0.0), "label_smoothing": Field("float", 0.0, lo=0.0, hi=0.99)}

    def __call__(self, out: StepOutputs) -> torch.Tensor:
        return F.cross_entropy(out.logits.float(), out.labels, ignore_index=IGNORE_INDEX,
                               label_smoothing=self.spec["label_smoothing"])


# Hint metrics: fastkd.hint_loss(kind=...) between equal-shape features (a learnable regressor
# maps the student's feature to the teacher's shape when they differ).
HINT_METRICS = HINT_KINDS
# Relational metrics: fastkd.<metric>_loss(student, teacher) on [B, ...] features (trailing dims
# flattened, widths may differ: no regressor), one per relational op of fastkd's op table.
RELATIONAL_METRICS = tuple(op.stem for op in table.all_ops("relational"))
FEATURE_METRICS = HINT_METRICS + ("at",) + RELATIONAL_METRICS


def relational_loss_fn(metric: str) -> Optional[Callable[..., torch.Tensor]]:
    """``fastkd.<metric>_loss``, or None where this fastkd does not have it."""
    return getattr(fastkd, f"{metric}_loss", None)


def feature_distance(s: torch.Tensor, t: torch.Tensor, metric: str, p: float = 2.0) -> torch.Tensor:
    """The feature loss ``metric`` between a student feature ``s`` and a teacher feature ``t``,
    both ``[B, ...]``, with fastkd's fused ops:

    * ``mse``, ``l1``, ``smooth_l1``, ``cosine``, ``normalized_mse``: :func:`fastkd.hint_loss`
      with that ``kind`` (means over all entries; ``cosine`` is ``mean_b (1 - cos(s_b, t_b))``);
      shapes must match.
    * ``at``: :func:`fastkd.attention_transfer_loss` with exponent ``p`` on ``[B, C, H, W]`` maps
      (channel counts may differ, spatial sizes must match).
    * ``rkd_distance``, ``rkd_angle``, ``sp``, ``pkt``: ``fastkd.<metric>_loss(s, t)``; 0 for a
      batch of one sample.
    """
    if metric in HINT_METRICS:
        return fastkd.hint_loss(s, t, kind=metric)
    if metric == "at":
        return fastkd.attention_transfer_loss(s, t, p=p)
    fn = relational_loss_fn(metric)
    if fn is None:
        raise RuntimeError(f"feature metric {metric!r} needs fastkd.{metric}_loss, which this fastkd does not have")
    if s.shape[0] < 2:
        # A batch of one sample (an epoch's last, say) has no pair to relate: the term is 0 for
        # it (the ops refuse B < 2, where the loss is undefined), still attached to the graph.
        return s.sum() * 0.0
    return fn(s, t)


@register_loss_term("feature")
class FeatureTerm(LossTerm):
    """A feature loss between the output of module ``student`` in the student and module
    ``teacher`` in teacher number ``teacher_index``, computed by a fused fastkd op chosen by
    ``metric`` (see :func:`feature_distance`). For the hint metrics, when the shapes differ a
    learnable regressor maps the student's feature to the teacher's shape (a 1x1 convolution when
    both are ``[B, C, H, W]`` with equal H, W; otherwise a linear map of the flattened feature);
    ``at`` and the relational metrics compare features of different widths as they are."""

    SCHEMA = {
        "weight": Field("float", 1.0, lo=0.0),
        "student": Field("str", ""),
        "teacher": Field("str", ""),
        "metric": Field("str", "mse", choices=FEATURE_METRICS),
        "teacher_index": Field("int", 0, lo=0),
        "p": Field("float", 2.0, lo=1.0, doc="metric 'at': the exponent of |x|^p"),
    }
    needs_teacher = True

    @classmethod
    def validate(cls, spec: dict, where: str) -> None:
        for key in ("student", "teacher"):
            if not spec[key]:
                raise ConfigError(f"{where}.{key} (a module path) is required for kind 'feature'")
        if spec["p"] != 2.0 and spec["metric"] != "at":
            raise ConfigError(f"{where}.p is the exponent of metric 'at'; it does not apply to metric {spec['metric']!r}")

    def student_paths(self) -> List[str]:
        return [self.spec["student"]]

    def teacher_paths(self) -> List[str]:
        return [self.spec["teacher"]]

    def make_regressor(self, student_feats, teacher_feats):
        s, t = student_feats[self.spec["student"]], teacher_feats[self.spec["teacher"]]
        metric, where = self.spec["metric"], f"loss[{self.index}]"
        if metric == "at":
            if s.dim() < 3 or t.dim() < 3 or s.shape[2:] != t.shape[2:]:
                raise ConfigError(
                    f"{where}.metric 'at' needs [B, C, H, W] feature maps of equal H, W; module "
                    f"{self.spec['student']!r} gives {tuple(s.shape)} and {self.spec['teacher']!r} {tuple(t.shape)}"
                )
            return None
        if metric in RELATIONAL_METRICS:
            return None
        if s.shape[1:] == t.shape[1:]:
            return None
        if s.dim() == 4 and t.dim() == 4 and s.shape[2:] == t.shape[2:]:
            return nn.Conv2d(s.shape[1], t.shape[1], kernel_size=1)
        return nn.Sequential(nn.Flatten(1), nn.Linear(s[0].numel(), t[0].numel()), nn.Unflatten(1, tuple(t.shape[1:])))

    def __call__(self, out: StepOutputs) -> torch.Tensor:
        s = out.features[self.spec["student"]]
        key = str(self.index)
        if key in out.regressors:
            s = out.regressors[key](s.float())
        t = out.teacher.features[self.spec["teacher_index"]][self.spec["teacher"]]
        return feature_distance(s, t, self.spec["metric"], self.spec.get("p", 2.0))


def build_terms(specs: List[dict], cached_teacher: bool = False) -> List[LossTerm]:
    """Instantiate validated ``[[loss]]`` tables (``cached_teacher``: the learner's teacher is
    read from a cache)."""
    return [LOSS_TERMS[s["kind"]].build(s, i, cached_teacher) for i, s in enumerate(specs)]


def ce_only() -> List[LossTerm]:
    """The loss of a model trained on labels alone."""
    return [CETerm({"kind": "ce", "weight": 1.0, "label_smoothing": 0.0}, 0)]


# A tapped path "input:<module path>" captures what enters that module (its first positional
# input) together with the module, as a (tensor, module) pair: a fused head reads the hidden
# states and the layer's weights from it.
INPUT_OF = "input:"


class FeatureTap:
    """Forward hooks capturing the outputs of named modules of a model (the model itself is
    not modified). ``captured[path]`` holds the latest output (for ``input:<path>``, the
    module's input and the module); :meth:`remove` detaches the hooks."""

    def __init__(self, model: nn.Module, paths: List[str], what: str):
        from fastkd.engine.models import get_module

        self.captured: Dict[str, torch.Tensor] = {}
        self._handles = []
        for path in dict.fromkeys(paths):
            name = path[len(INPUT_OF):] if path.startswith(INPUT_OF) else path
            module = get_module(model, name, what)
            self._handles.append(module.register_forward_hook(self._hook(path, path != name)))

    def _hook(self, path: str, want_input: bool):
        def hook(module, inputs, output):
            self.captured[path] = (inputs[0], module) if want_input else output

        return hook

    def take(self) -> Dict[str, torch.Tensor]:
        out, self.captured = self.captured, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
