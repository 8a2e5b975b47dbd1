"""A job's teacher read from a teacher cache: the cache format (:mod:`fastkd.teacher_cache`) as the
engine's language-model task uses it.

A job whose ``teacher.cache`` names a cache written by ``fastkd cache-teacher`` runs no teacher.
:class:`CachedTeacher` opens the cache and refuses one made for another job (the fingerprints of
the tokenizer and of the training windows, the row count, top-k, the vocabulary), checks every
shard before training starts, checks each KD term against it (its ``values`` and ``tail``; a
sampled cache only at temperature 1), finds the teacher the cache was written with when it is
still at hand, and gives each training batch its rows as a
:class:`~fastkd.engine.losses.SparseTeacher`. The rows of training window ``w`` are cache rows
``[w·(C−1), (w+1)·(C−1))`` for windows of C tokens, one per position that predicts a label.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

from fastkd import teacher_cache as tc
from fastkd.engine.losses import SparseTeacher
from fastkd.engine.schema import ConfigError


def job_fingerprints(splits, context: int) -> Dict[str, str]:
    """What a cache of a job's teacher is tied to: the tokenizer (``vocabulary``) and the
    training windows of ``context`` tokens it was run over (``data``)."""
    import xxhash

    vocab = xxhash.xxh3_128(splits.tokenizer.to_str().encode()).hexdigest()
    h = xxhash.xxh3_128(f"context={context}|".encode())
    h.update(splits.train.x.numpy().tobytes())
    h.update(splits.train.y.numpy().tobytes())
    return {"vocabulary": f"xxh3_128:{vocab}", "data": f"xxh3_128:{h.hexdigest()}"}


def job_tokens(splits, context: int) -> int:
    """Rows of a cache of the training split: one per position that predicts a label."""
    return len(splits.train.y) * (context - 1)


class CachedTeacher:
    """The cache of a job (``cfg``, its ``splits``), opened and checked; a problem is a
    :class:`ConfigError`. ``build_teacher(directory)`` loads the teacher model saved there.

    ``cache``: the :class:`~fastkd.teacher_cache.TeacherCache`; ``tails``: each KD term's tail;
    ``reference``: what students are measured against (``"teacher_0"``, the teacher the cache
    was written with, when it is still at hand, else the cache itself, saying why);
    ``teacher_dir``: that teacher's directory, or None."""

    @staticmethod
    def check_config(cfg: dict) -> None:
        """The checks of a job reading ``teacher.cache`` that need no data."""
        for i, term in enumerate(cfg["loss"]):
            if term["kind"] == "kd" and term["divergence"] != "kl":
                raise ConfigError(f"loss[{i}].divergence {term['divergence']!r}: a cached teacher is read by "
                                  "fastkd.sparse_kd_loss, whose divergence is KL")

    def __init__(self, cfg: dict, splits, build_teacher: Callable[[str], torch.nn.Module]):
        directory, context = cfg["teacher"]["cache"], cfg["data"]["context"]
        try:
            cache = tc.TeacherCache(directory)
            cache.check_matches(fingerprints=job_fingerprints(splits, context), tokens=job_tokens(splits, context),
                                top_k=cfg["teacher"]["cache_top_k"] or None, vocab_size=splits.vocab_size)
            cache.verify()  # every shard's size and hash, before any training step reads one
        except tc.CacheError as exc:
            raise ConfigError(str(exc)) from None
        self.cache = cache
        self.tails: List[str] = [self._tail(i, term, directory) for i, term in enumerate(cfg["loss"]) if term["kind"] == "kd"]
        self.windows = tc.CachedWindows(cache, splits.train.x, splits.train.y)
        self.reference, self.teacher_dir = self._find_writer(build_teacher)

    def _tail(self, i: int, term: dict, directory: str) -> str:
        """The tail KD term ``i`` reads the cache with (its own, or the one that reads the cache
        as written), after checking the term against the cache."""
        cache = self.cache
        values, tail = term["values"] or cache.values, term["tail"] or cache.default_tail
        if tail == "uniform" and values != "logprobs":
            raise ConfigError(f"loss[{i}].tail 'uniform' needs log-probabilities, and the cached values are read as {values}")
        if cache.selection == "sample" and term["temperature"] != 1.0:
            raise ConfigError(f"loss[{i}].temperature {term['temperature']}: the cache {directory} holds samples of the "
                              "teacher at temperature 1, an unbiased estimate only at temperature 1")
        return tail

    def _find_writer(self, build_teacher) -> Tuple[str, Optional[str]]:
        """The teacher the cache was written with, if it is still where the manifest says and is
        still that teacher: ``(what students are measured against, its directory or None)``."""
        cache = self.cache
        where = (cache.info.get("teacher") or {}).get("dir")
        fallback = f"cached {cache.describe()} (training split)"
        if not where or not os.path.isfile(os.path.join(where, "config.json")):
            return f"{fallback}: the teacher it was written with is not at hand", None
        try:
            model = build_teacher(where)
        except (ValueError, LookupError) as exc:
            return f"{fallback}: the teacher in {where} cannot be loaded ({exc})", None
        if tc.state_fingerprint(model) != cache.fingerprints.get("teacher"):
            return f"{fallback}: {where} no longer holds the teacher the cache was written with", None
        return "teacher_0", where

    def batch(self, windows) -> SparseTeacher:
        """The cached teacher of a batch of training windows (their indices), row-aligned with
        the task's view of the student's output."""
        idx, val = self.windows.rows(windows)
        return SparseTeacher(idx, val, self.cache.values, self.cache.default_tail)

    def summary(self) -> dict:
        """``summary.teacher_cache``: what the job read its teacher from."""
        c = self.cache
        return {"dir": str(c.dir), "tokens": c.tokens, "top_k": c.top_k, "selection": c.selection, "values": c.values,
                "value_dtype": c.value_dtype, "tail": "+".join(dict.fromkeys(self.tails)) or None, "bytes": c.bytes,
                "bytes_per_token": round(c.bytes_per_token, 3), "reference": self.reference}
