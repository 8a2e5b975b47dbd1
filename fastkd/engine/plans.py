"""Each method as a sequence of phases, and the models its summary reports.

Every plan reports three entries that make methods comparable: ``student_kd`` (the model the
method produces), ``student_baseline`` (the same architecture trained on labels alone, from the
same initialisation and on the same batches where possible) and, where the method has one,
``teacher``. Students' ``agreement`` and ``predictive_kl`` are measured against the entry's
``reference``.

- ``distill`` (Hinton KD, ensembles, feature losses, weighted sums): teachers ``teacher_0..M-1``
  trained from seeds ``seed+1000+i`` for ``teacher.epochs`` (default: ``train.epochs``); then ``student_baseline`` and ``student_kd`` train
  together, the latter on the configured ``[[loss]]`` terms against the teachers' averaged
  output. With ``teacher.cache`` the teachers' phase is left out and ``student_kd`` reads its
  teacher from the cache, on the batches it would have seen after that phase; students are
  measured against the teacher the cache was written with when it is at hand (``teacher_0``,
  loaded, not trained), else against the cache itself (see ``LMTask.cache_fidelity``).
  ``teacher_only`` plans the teachers' phase alone (``fastkd cache-teacher`` trains its teacher
  so).
- ``self_distill`` (born-again): ``generation_0`` trained on labels, ``generation_k`` distilled
  from ``generation_{k-1}``; the baseline is a second model trained on labels beside
  generation 1. ``teacher`` is the last generation's teacher.
- ``mutual`` (deep mutual learning): peers ``peer_i`` train together, each distilling from the
  others' current outputs; ``independent_i`` train alone from the same seeds on the same batches.
  Agreement is measured with the other peers (resp. the other independents).
- ``stagewise`` (Kulkarni et al.): teachers as in ``distill``; the student trains stage by stage
  to match ``teacher_0``'s feature at the same stage (feature MSE, the rest frozen), then
  everything after the stages trains on labels; the baseline trains on labels on the same
  ``stagewise.fraction`` of the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from fastkd.engine.losses import build_terms, ce_only
from fastkd.engine.tasks import CACHED_TEACHER
from fastkd.engine.trainer import LearnerSpec, Phase


@dataclass
class Entry:
    """A summary row: the ensemble of ``models`` evaluated on the test split, with agreement
    and predictive KL against the ensemble of ``reference`` (if any)."""

    name: str
    models: List[str]
    reference: Optional[List[str]] = None


def _teacher_phase(cfg: dict, fraction: float = 1.0) -> tuple:
    names = [f"teacher_{i}" for i in range(cfg["teacher"]["count"])]
    learners = [LearnerSpec(n, "teacher", cfg["seed"] + 1000 + i, ce_only()) for i, n in enumerate(names)]
    epochs = cfg["teacher"]["epochs"] or cfg["train"]["epochs"]
    return Phase("teachers", learners, epochs, fraction, shared_batches=not cfg["teacher"]["independent_batches"]), names


def plan(cfg: dict, external=(), teacher_only: bool = False) -> tuple:
    """``(phases, entries)`` for ``cfg["method"]``; ``external``: names of finished models the
    job did not train (the store holds them before the first phase)."""
    method, seed, epochs = cfg["method"], cfg["seed"], cfg["train"]["epochs"]
    s0 = seed + 2000  # the students' initialisation seed
    if teacher_only:
        tphase, teachers = _teacher_phase(cfg)
        return [tphase], [Entry("teacher", teachers)]
    if method == "distill" and cfg["teacher"]["cache"]:
        ref = ["teacher_0"] if "teacher_0" in external else []
        students = Phase("students", [
            LearnerSpec("student_baseline", "student", s0, ce_only(), reference=ref, compress=True),
            LearnerSpec("student_kd", "student", s0, build_terms(cfg["loss"], cached_teacher=True), teachers=[CACHED_TEACHER], reference=ref,
                        compress=True),
        ], epochs, stream=1)
        entries = [Entry("teacher", ref)] if ref else []
        entries += [Entry("student_baseline", ["student_baseline"], ref or None), Entry("student_kd", ["student_kd"], ref or None)]
        return [students], entries
    if method == "distill":
        tphase, teachers = _teacher_phase(cfg)
        students = Phase("students", [
            LearnerSpec("student_baseline", "student", s0, ce_only(), reference=teachers, compress=True),
            LearnerSpec("student_kd", "student", s0, build_terms(cfg["loss"]), teachers=teachers, reference=teachers,
                        compress=True),
        ], epochs)
        entries = [Entry("teacher", teachers)] + ([Entry(t, [t]) for t in teachers] if len(teachers) > 1 else [])
        entries += [Entry("student_baseline", ["student_baseline"], teachers), Entry("student_kd", ["student_kd"], teachers)]
        return [tphase, students], entries

    if method == "self_distill":
        g = cfg["self_distill"]["generations"]
        phases = [Phase("generation_0", [LearnerSpec("generation_0", "student", s0, ce_only(), compress=True)], epochs)]
        for k in range(1, g + 1):
            prev = f"generation_{k - 1}"
            learners = [LearnerSpec(f"generation_{k}", "student", s0 + k, build_terms(cfg["loss"]), teachers=[prev],
                                    reference=[prev], compress=True)]
            if k == 1:
                learners.append(LearnerSpec("student_baseline", "student", s0 + 1, ce_only(), reference=[prev], compress=True))
            phases.append(Phase(f"generation_{k}", learners, epochs))
        last_teacher = f"generation_{g - 1}"
        entries = [Entry("teacher", [last_teacher])]
        entries += [Entry(f"generation_{k}", [f"generation_{k}"], [f"generation_{k - 1}"] if k else None) for k in range(g + 1)]
        entries += [Entry("student_baseline", ["student_baseline"], [last_teacher]),
                    Entry("student_kd", [f"generation_{g}"], [last_teacher])]
        return phases, entries

    if method == "mutual":
        n = cfg["mutual"]["peers"]
        peers = [f"peer_{i}" for i in range(n)]
        alone = [f"independent_{i}" for i in range(n)]
        learners = []
        for i in range(n):
            others = [p for p in peers if p != peers[i]]
            learners.append(LearnerSpec(peers[i], "student", s0 + i, build_terms(cfg["loss"]), peers=others,
                                        reference=others, compress=True))
        for i in range(n):
            others = [p for p in alone if p != alone[i]]
            learners.append(LearnerSpec(alone[i], "student", s0 + i, ce_only(), reference=others, compress=True))
        entries = [Entry(p, [p], [q for q in peers if q != p]) for p in peers]
        entries += [Entry(a, [a], [q for q in alone if q != a]) for a in alone]
        entries += [Entry("student_baseline", [alone[0]], alone[1:]), Entry("student_kd", [peers[0]], peers[1:])]
        return [Phase("mutual", learners, epochs)], entries

    if method == "stagewise":
        st = cfg["stagewise"]
        stage_epochs = st["stage_epochs"] or epochs
        tphase, teachers = _teacher_phase(cfg)
        phases = [tphase, Phase("baseline", [LearnerSpec("student_baseline", "student", s0, ce_only(), reference=teachers)],
                                     epochs, st["fraction"])]
        for i, (sp, tp) in enumerate(zip(st["student_stages"], st["teacher_stages"])):
            term = {"kind": "feature", "weight": 1.0, "student": sp, "teacher": tp, "metric": "mse", "teacher_index": 0}
            phases.append(Phase(f"stage_{i}", [LearnerSpec(
                "student_kd", "student", s0, build_terms([term]), teachers=[teachers[0]], reference=teachers,
                init_from="student_kd" if i else None, trainable=[sp],
            )], stage_epochs, st["fraction"]))
        phases.append(Phase("head", [LearnerSpec(
            "student_kd", "student", s0, ce_only(), reference=teachers, init_from="student_kd",
            frozen=list(st["student_stages"]),
        )], stage_epochs, st["fraction"]))
        entries = [Entry("teacher", teachers), Entry("student_baseline", ["student_baseline"], teachers),
                   Entry("student_kd", ["student_kd"], teachers)]
        return phases, entries

    raise ValueError(f"unknown method {method!r}")
