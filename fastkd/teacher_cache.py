"""A teacher's top-k per token, written once, read by every student run: the teacher-logit cache.

Layout of a cache directory (nothing else is in it)::

    manifest.json              format version, what the cache is tied to, and every finished shard
    shard-00000.safetensors    tokens [0, S): "indices" [S, K] uint8/16/32, "values" [S, K] bf16/fp16
    shard-00001.safetensors    tokens [S, 2S) ...

Row ``t`` of the cache is the teacher's next-token distribution at token position ``t`` of the
stream it was run over (for a language model: the concatenated training windows, in order), cut
to its K largest entries (``selection = "top_k"``): their vocabulary indices (the narrowest
unsigned type that holds V) and their values (log-probabilities at temperature 1, or raw logits)
in a 2-byte float. ``selection = "sample"`` keeps K draws from the distribution instead, as the
distinct indices drawn and their log-frequencies (:func:`sample_rows`). Storage is therefore
4·K bytes per token plus each shard's header and the manifest.

``fastkd cache-teacher`` (:mod:`fastkd.cache_cli`) writes a language-model job's cache;
``fastkd distill --teacher-cache`` reads it (``LMTask`` in :mod:`fastkd.engine.tasks`).

Writing is resumable and never leaves a torn file: a shard is written under a temporary name,
flushed and renamed when complete, then the manifest (which lists each finished shard with its
token range, byte size and xxh3-128 content hash) is rewritten the same way. ``resume=True``
continues after the last shard the manifest lists and never rewrites one.

Reading memory-maps the shards (safetensors), and checks each shard's size and hash the first
time it is opened, so that a corrupted or truncated shard stops the run with a one-line
:class:`CacheError` naming the file before any of its rows is used.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

FORMAT = "fastkd-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VALUE_KINDS = ("logprobs", "logits")
# How a row's K entries are chosen: the K largest ("top_k"), or K draws from the teacher's
# distribution ("sample", Sparse Logit Sampling; see sample_rows).
SELECTIONS = ("top_k", "sample")
VALUE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHARD_TOKENS = 1 << 16


class CacheError(Exception):
    """A cache that cannot be used or continued, said in one line."""


def index_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest unsigned integer type that holds every index of a ``vocab_size`` vocabulary."""
    if vocab_size <= 1 << 8:
        return torch.uint8
    if vocab_size <= 1 << 16:
        return torch.uint16
    if vocab_size <= 1 << 32:
        return torch.uint32
    raise CacheError(f"vocabulary of {vocab_size} entries: indices above 2^32 are not supported")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def file_hash(path: Path) -> str:
    """``xxh3_128:<hex>`` of the file's bytes."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"xxh3_128:{h.hexdigest()}"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class CacheSpec:
    """What a cache holds and what it is tied to; a resumed write must match it exactly.

    ``tokens``: rows the finished cache will hold. ``fingerprints``: strings naming the tokenizer
    and vocabulary (``vocabulary``), the teacher (``teacher``) and the token stream (``data``);
    a reader compares them with its own job's.
    """

    top_k: int
    vocab_size: int
    tokens: int
    values: str = "logprobs"
    value_dtype: str = "bfloat16"
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    fingerprints: Dict[str, str] = field(default_factory=dict)
    selection: str = "top_k"

    def check(self) -> None:
        if self.values not in VALUE_KINDS:
            raise CacheError(f"values must be one of {', '.join(VALUE_KINDS)}, got {self.values!r}")
        if self.selection not in SELECTIONS:
            raise CacheError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.selection == "sample" and self.values != "logprobs":
            raise CacheError("a sampled cache stores the draws' frequencies as log-probabilities: values must be 'logprobs'")
        if self.value_dtype not in VALUE_DTYPES:
            raise CacheError(f"value dtype must be one of {', '.join(VALUE_DTYPES)}, got {self.value_dtype!r}")
        if not 1 <= self.top_k <= self.vocab_size:
            raise CacheError(f"top-k must be between 1 and the vocabulary size {self.vocab_size}, got {self.top_k}")
        if self.tokens < 1 or self.shard_tokens < 1:
            raise CacheError(f"tokens and shard_tokens must be positive, got {self.tokens} and {self.shard_tokens}")
        index_dtype(self.vocab_size)


def _differences(want: Dict, have: Dict, keys) -> List[str]:
    return [f"{k} {have.get(k)!r} (this job: {want.get(k)!r})" for k in keys if want.get(k) != have.get(k)]


class CacheWriter:
    """Appends rows to a cache directory, one atomic shard at a time.

    ``add(indices, values)`` takes ``[T, K]`` tensors (any device; values as float); whole shards
    are written as soon as enough rows are buffered. ``finish()`` writes the last, shorter shard
    and marks the cache complete. ``tokens_done`` is where a resumed writer starts: the caller
    skips that many rows of its stream.
    """

    def __init__(self, directory, spec: CacheSpec, resume: bool = False, info: Optional[Dict] = None):
        spec.check()
        self.dir = Path(directory)
        self.spec = spec
        self._idx_dtype = index_dtype(spec.vocab_size)
        self._val_dtype = VALUE_DTYPES[spec.value_dtype]
        self._pending: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_rows = 0
        manifest_path = self.dir / MANIFEST
        if manifest_path.exists():
            if not resume:
                raise CacheError(f"{self.dir} already holds a teacher cache: pass --resume to continue it, or another --out")
            self.manifest = read_manifest(self.dir)
            have = self.manifest["spec"]
            wanted = asdict(spec)
            have = {"selection": "top_k", **have}
            diff = _differences(wanted, have, ("top_k", "selection", "vocab_size", "tokens", "values", "value_dtype", "shard_tokens"))
            diff += _differences(wanted["fingerprints"], have.get("fingerprints", {}), sorted(set(wanted["fingerprints"]) | set(have.get("fingerprints", {}))))
            if diff:
                raise CacheError(f"cannot resume {self.dir}: it was written with " + "; ".join(diff))
            for entry in self.manifest["shards"]:
                _check_shard_file(self.dir, entry)
            for stray in self.dir.glob(".*.tmp"):
                stray.unlink()  # a shard or manifest cut short by the interruption
        else:
            if self.dir.exists() and any(self.dir.iterdir()):
                raise CacheError(f"{self.dir} is not empty and holds no teacher cache: choose an empty or new --out")
            self.dir.mkdir(parents=True, exist_ok=True)
            self.manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION, "spec": asdict(spec),
                "index_dtype": str(self._idx_dtype).removeprefix("torch."), "complete": False,
                "info": info or {}, "shards": [],
            }
            self._write_manifest()

    @property
    def tokens_done(self) -> int:
        return sum(e["token_end"] - e["token_start"] for e in self.manifest["shards"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def set_info(self, **info) -> None:
        """Records facts about the run (e.g. where the teacher it ran was saved) in the manifest."""
        self.manifest["info"].update(info)
        self._write_manifest()

    def add(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        k = self.spec.top_k
        if indices.shape != values.shape or indices.dim() != 2 or indices.shape[1] != k:
            raise CacheError(f"expected indices and values of shape [T, {k}], got {tuple(indices.shape)} and {tuple(values.shape)}")
        if self.tokens_done + self._pending_rows + indices.shape[0] > self.spec.tokens:
            raise CacheError(f"more rows than the cache's {self.spec.tokens} tokens")
        values = values.detach().to("cpu", torch.float32)
        if torch.isnan(values).any():
            # A student would read NaN targets from the cache for good; -inf is fine (no mass).
            row = int(torch.isnan(values).any(-1).nonzero()[0])
            raise CacheError(f"row {self.tokens_done + self._pending_rows + row} of the values is NaN: the teacher's "
                             "output is not finite there, and a cache never holds such a row")
        self._pending.append((indices.detach().to("cpu", torch.int64), values))
        self._pending_rows += indices.shape[0]
        while self._pending_rows >= self.spec.shard_tokens:
            self._flush(self.spec.shard_tokens)

    def finish(self) -> None:
        if self._pending_rows:
            self._flush(self._pending_rows)
        if self.tokens_done != self.spec.tokens:
            raise CacheError(f"the cache holds {self.tokens_done} tokens, {self.spec.tokens} were expected")
        self.manifest["complete"] = True
        self._write_manifest()

    def _flush(self, rows: int) -> None:
        from safetensors.torch import save_file

        idx = torch.cat([i for i, _ in self._pending])
        val = torch.cat([v for _, v in self._pending])
        take_i, rest_i = idx[:rows], idx[rows:]
        take_v, rest_v = val[:rows], val[rows:]
        self._pending = [(rest_i, rest_v)] if rest_i.shape[0] else []
        self._pending_rows = rest_i.shape[0]
        start = self.tokens_done
        number = len(self.manifest["shards"])
        name = shard_name(number)
        final = self.dir / name
        tmp = self.dir / f".{name}.tmp"
        tensors = {"indices": take_i.to(self._idx_dtype).contiguous(), "values": take_v.to(self._val_dtype).contiguous()}
        # One metadata key: safetensors keeps metadata in a hash map whose order varies between
        # processes, and a resumed cache should be byte-identical to one written in one go.
        save_file(tensors, str(tmp), metadata={"tokens": f"{start}:{start + rows}"})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self.manifest["shards"].append({
            "file": name, "token_start": start, "token_end": start + rows,
            "bytes": final.stat().st_size, "hash": file_hash(final),
        })
        self._write_manifest()

    def _write_manifest(self) -> None:
        _write_atomic(self.dir / MANIFEST, (json.dumps(self.manifest, indent=1) + "\n").encode())


def read_manifest(directory: Path) -> Dict:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise CacheError(f"{directory} holds no {MANIFEST}: not a teacher cache")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path}: unreadable ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: not a fastkd teacher cache manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path}: format version {manifest.get('format_version')}, this fastkd reads {FORMAT_VERSION}")
    return manifest


def _check_shard_file(directory: Path, entry: Dict) -> None:
    path = Path(directory) / entry["file"]
    if not path.exists():
        raise CacheError(f"{path}: missing (the manifest lists it)")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CacheError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or rewritten)")
    if file_hash(path) != entry["hash"]:
        raise CacheError(f"{path}: content hash differs from the manifest's (corrupted)")


class TeacherCache:
    """A finished cache, read lazily: ``rows(start, end)`` gives ``(indices int64 [n, K], values
    float32 [n, K])`` for cache rows ``[start, end)``, across shard boundaries; log-probabilities
    whose storage rounding lifted a row's mass above 1 come back scaled to mass 1."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir)
        if not self.manifest.get("complete"):
            raise CacheError(f"{self.dir}: the cache was not finished (run cache-teacher again with --resume)")
        spec = self.manifest["spec"]
        self.top_k: int = spec["top_k"]
        self.vocab_size: int = spec["vocab_size"]
        self.tokens: int = spec["tokens"]
        self.values: str = spec["values"]
        self.value_dtype: str = spec["value_dtype"]
        self.selection: str = spec.get("selection", "top_k")
        self.fingerprints: Dict[str, str] = dict(spec.get("fingerprints", {}))
        self.info: Dict = dict(self.manifest.get("info", {}))
        self.shards: List[Dict] = self.manifest["shards"]
        self._starts = [e["token_start"] for e in self.shards]
        self._open: Dict[int, object] = {}

    @property
    def bytes(self) -> int:
        """Every file of the cache, the manifest included."""
        return sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file())

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens

    @property
    def default_tail(self) -> str:
        """The ``sparse_kd_loss`` tail that reads this cache as written: top-k log-probabilities
        leave out a known mass, spread over the rest (``uniform``); logits carry no mass to
        spread, and a sampled row's frequencies already sum to 1 (``renormalize``)."""
        return "uniform" if self.values == "logprobs" and self.selection == "top_k" else "renormalize"

    def describe(self) -> str:
        """``top-32 log-probabilities`` / ``32 samples``: what a row holds, for reports."""
        return f"{self.top_k} samples" if self.selection == "sample" else f"top-{self.top_k} {self.values}"

    def check_matches(self, *, fingerprints: Dict[str, str], tokens: Optional[int] = None, top_k: Optional[int] = None,
                      vocab_size: Optional[int] = None) -> None:
        """Refuses, in one line naming each difference, a cache made for another job."""
        diff = []
        for key, want in sorted(fingerprints.items()):
            if self.fingerprints.get(key) != want:
                diff.append(f"{key} fingerprint {self.fingerprints.get(key)!r} (this job: {want!r})")
        for name, want, have in (("tokens", tokens, self.tokens), ("top-k", top_k, self.top_k),
                                 ("vocabulary size", vocab_size, self.vocab_size)):
            if want is not None and want != have:
                diff.append(f"{name} {have} (this job: {want})")
        if diff:
            raise CacheError(f"the teacher cache {self.dir} does not match this job: " + "; ".join(diff))

    def verify(self) -> None:
        """Opens (and so checks) every shard now: before training, not halfway through it."""
        for i in range(len(self.shards)):
            self._shard(i)

    def _shard(self, i: int):
        if i not in self._open:
            from safetensors import safe_open

            entry = self.shards[i]
            _check_shard_file(self.dir, entry)
            try:
                handle = safe_open(str(self.dir / entry["file"]), framework="pt")
                rows = handle.get_slice("indices").get_shape()
            except Exception as exc:  # noqa: BLE001 - safetensors' own errors: a bad file either way
                raise CacheError(f"{self.dir / entry['file']}: not a readable safetensors file ({exc})") from None
            if rows != [entry["token_end"] - entry["token_start"], self.top_k]:
                raise CacheError(f"{self.dir / entry['file']}: indices of shape {rows}, the manifest implies "
                                 f"[{entry['token_end'] - entry['token_start']}, {self.top_k}]")
            self._open[i] = handle
        return self._open[i]

    def rows(self, start: int, end: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= start <= end <= self.tokens:
            raise IndexError(f"rows [{start}, {end}) outside the cache's {self.tokens} tokens")
        import bisect

        parts_i, parts_v = [], []
        pos = start
        while pos < end:
            i = bisect.bisect_right(self._starts, pos) - 1
            entry = self.shards[i]
            stop = min(end, entry["token_end"])
            handle = self._shard(i)
            lo, hi = pos - entry["token_start"], stop - entry["token_start"]
            parts_i.append(handle.get_slice("indices")[lo:hi].to(torch.int64))
            parts_v.append(handle.get_slice("values")[lo:hi].to(torch.float32))
            pos = stop
        if not parts_i:
            return torch.empty(0, self.top_k, dtype=torch.int64), torch.empty(0, self.top_k)
        idx, val = torch.cat(parts_i), torch.cat(parts_v)
        if self.values == "logprobs":
            # Rounded to 2 bytes, a row's kept log-probabilities can sum (as probabilities) to a
            # little over 1 (0.2 % at bf16 with every entry kept), which tail="uniform" refuses:
            # take that rounding back out, leaving rows with mass below 1 as they are.
            val = val - torch.logsumexp(val, dim=-1, keepdim=True).clamp_min(0)
        return idx, val


class CachedWindows(torch.utils.data.Dataset):
    """Token windows with their teacher rows, for a training loop of your own: item ``w`` is
    ``(x[w], y[w], indices, values)`` with ``indices``/``values`` ``[R, K]`` the cache rows
    ``[w·R, (w+1)·R)``, read from the memory-mapped shards when asked for (the cache is never
    loaded whole). ``x``/``y`` are the ``[N, C]`` windows the cache was written over; ``R``,
    the rows per window, defaults to ``C − 1`` (a language model's positions that predict a
    label: ``fastkd cache-teacher``'s layout). The default collate stacks items into
    ``[B, C]`` and ``[B, R, K]``; :meth:`rows` gives a batch's rows flat, ``[B·R, K]``, as
    ``sparse_kd_loss`` takes them beside the student's ``[B·R, V]`` logits."""

    def __init__(self, cache: "TeacherCache", x: torch.Tensor, y: torch.Tensor, rows_per_window: Optional[int] = None):
        if x.dim() != 2 or x.shape != y.shape:
            raise CacheError(f"windows x and y must be [N, C] of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        self.cache, self.x, self.y = cache, x, y
        self.per = x.shape[1] - 1 if rows_per_window is None else rows_per_window
        if self.per < 1 or len(x) * self.per != cache.tokens:
            raise CacheError(f"{cache.dir} holds {cache.tokens} rows, and {len(x)} windows of {self.per} rows make "
                             f"{len(x) * self.per}: the cache was written over other windows")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, w: int):
        idx, val = self.cache.rows(int(w) * self.per, (int(w) + 1) * self.per)
        return self.x[w], self.y[w], idx, val

    def rows(self, windows) -> Tuple[torch.Tensor, torch.Tensor]:
        """The rows of ``windows`` (indices), window after window: ``([B·R, K], [B·R, K])``."""
        parts = [self.cache.rows(int(w) * self.per, (int(w) + 1) * self.per) for w in windows]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def top_k_rows(logits: torch.Tensor, k: int, values: str = "logprobs") -> Tuple[torch.Tensor, torch.Tensor]:
    """The K largest entries of each row of ``logits [T, V]``: ``(indices, values)``, values as
    log-probabilities at temperature 1 (``"logprobs"``) or the raw logits."""
    logits = logits.float()
    top = logits.topk(k, dim=-1)
    if values == "logits":
        return top.indices, top.values
    return top.indices, top.values - torch.logsumexp(logits, dim=-1, keepdim=True)


def sample_rows(logits: torch.Tensor, k: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """K draws per row from the teacher's distribution ``softmax(logits)`` (temperature 1), kept
    as the distinct indices drawn and the log of their frequency, ``log(count / K)``; the K − u
    unused slots of a row with u distinct draws hold other (distinct) indices at ``-inf`` (no
    mass). Sparse Logit Sampling (Anshumann et al., ACL 2025) with the teacher itself as the
    proposal, so that every importance weight is 1: the stored row p̂ has E[p̂] = p, and the
    gradient of KL(p̂ ‖ softmax(s)) in s, softmax(s) − p̂, is an unbiased estimate of the full
    KD gradient softmax(s) − p at temperature 1, where top-k's is biased (its p is cut to the
    head). The loss value itself is not unbiased (its entropy term is p̂'s), nor is the
    gradient at another temperature (p^(1/T) is not linear in p)."""
    probs = torch.softmax(logits.float(), dim=-1)
    draws = torch.multinomial(probs, k, replacement=True, generator=generator)
    counts = torch.zeros_like(probs).scatter_add_(1, draws, torch.ones_like(draws, dtype=probs.dtype))
    top = counts.topk(k, dim=-1)
    return top.indices, torch.log(top.values / k)


def state_fingerprint(module: torch.nn.Module) -> str:
    """``xxh3_128:<hex>`` of a model's parameters and buffers (names, dtypes, shapes, bytes): the
    teacher a cache was written with, recognised again when it is loaded to measure against."""
    import xxhash

    h = xxhash.xxh3_128()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"xxh3_128:{h.hexdigest()}"


def storage_bound(top_k: int) -> int:
    """Bytes per token the format promises at most, every file included: 2-byte indices and
    values, and 16 bytes for shard headers and the manifest."""
    return 4 * top_k + 16


__all__ = [
    "CacheError", "CacheSpec", "CacheWriter", "TeacherCache", "CachedWindows", "index_dtype", "file_hash", "top_k_rows",
    "sample_rows", "state_fingerprint", "storage_bound", "shard_name", "FORMAT_VERSION", "MANIFEST", "SELECTIONS",
]
