"""Text for language-model jobs: an embedded corpus, a byte-level BPE, token windows.

The embedded corpus is real text every machine with Python already holds: the source files of
a fixed list of standard-library modules (:data:`STDLIB_MODULES`, read from
``sysconfig.get_paths()["stdlib"]``), one document per module, so that the same Python gives
the same corpus wherever it runs (another Python version gives a slightly different one, and
a different corpus hash). A user's own data is ``data.path``: a folder of text files (one
document each), one text file (documents separated by blank lines), or a ``.npy`` of token ids
(documents separated by the tokenizer's ``<|endoftext|>``) with ``data.tokenizer``.

Documents, never windows, are split into train/validation/test, so no test text was seen in
training, not even as the tail of a window. The tokenizer is a byte-level BPE trained with the
``tokenizers`` library on the training documents only, saved as ``tokenizer.json`` in a cache
folder keyed by the hash of those documents and the vocabulary size (``$FASTKD_CACHE``, default
``~/.cache/fastkd``), so a second run reuses it. Each split is one token stream (documents
joined by ``<|endoftext|>``) cut into windows of ``context`` tokens; labels are the input ids
(Hugging Face's convention: the model shifts them), with the last window's padding labelled
``-100`` so that it counts nowhere.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from fastkd.data import DataError, Dataset

EOS = "<|endoftext|>"
IGNORE_INDEX = -100

# Pure-Python modules present in every CPython since 3.11 (no module deprecated for removal),
# a mix of prose-heavy docstrings and code. Order matters only for ``data.documents``, which
# keeps the first N.
STDLIB_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "cmd", "code", "codecs", "colorsys",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "dis",
    "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt",
    "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "imaplib", "inspect", "ipaddress",
    "keyword", "linecache", "locale", "mailbox", "numbers", "operator", "optparse", "os",
    "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue",
    "quopri", "random", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "smtplib", "socket", "socketserver", "statistics", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "token", "tokenize", "trace",
    "traceback", "turtle", "types", "typing", "uuid", "warnings", "wave", "weakref", "zipfile",
    "zipapp", "collections", "html", "json", "logging", "unittest.case",
)


@dataclass
class Corpus:
    """Documents (``texts``, or token-id arrays ``ids`` for a ``.npy``) and their names."""

    names: List[str]
    texts: Optional[List[str]] = None
    ids: Optional[List[np.ndarray]] = None


def _module_file(root: str, module: str) -> str:
    base = os.path.join(root, *module.split("."))
    # Some modules became packages in later Pythons (pathlib in 3.13, zipfile in 3.12).
    return base + ".py" if os.path.isfile(base + ".py") else os.path.join(base, "__init__.py")


def stdlib_corpus(documents: int = 0) -> Corpus:
    """The embedded corpus: the first ``documents`` modules of :data:`STDLIB_MODULES` (0: all)."""
    root = sysconfig.get_paths()["stdlib"]
    names = list(STDLIB_MODULES[: documents or None])
    texts = []
    for name in names:
        path = _module_file(root, name)
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except OSError as exc:
            raise DataError(f"lm: the standard library's {name} ({path}) cannot be read ({exc.strerror})") from None
    return Corpus(names, texts=texts)


def user_corpus(path: str, tokenizer: Optional[str]) -> Corpus:
    """``data.path``: a folder of text files, a text file, or a ``.npy`` of token ids."""
    if not os.path.exists(path):
        raise DataError(f"data.path {path} does not exist")
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)) and not f.startswith("."))
        texts = []
        for f in files:
            try:
                with open(os.path.join(path, f), encoding="utf-8") as fh:
                    texts.append(fh.read())
            except (OSError, UnicodeDecodeError) as exc:
                raise DataError(f"data.path: {os.path.join(path, f)} is not readable UTF-8 text ({exc})") from None
        return Corpus(files, texts=texts)
    if path.endswith(".npy"):
        if not tokenizer:
            raise DataError(f"data.path {path} holds token ids: name their tokenizer.json in data.tokenizer")
        try:
            stream = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"data.path {path}: cannot read the token ids ({exc})") from None
        if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer) or (stream.size and stream.min() < 0):
            raise DataError(f"data.path {path} must hold a 1-D array of non-negative integer token ids, "
                            f"got shape {stream.shape} {stream.dtype}")
        return Corpus([], ids=[stream.astype(np.int64)])
    try:
        with open(path, encoding="utf-8") as f:
            paragraphs = [p.strip("\n") for p in f.read().split("\n\n")]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"data.path {path} is not readable UTF-8 text ({exc})") from None
    texts = [p for p in paragraphs if p.strip()]
    return Corpus([f"{os.path.basename(path)}:{i}" for i in range(len(texts))], texts=texts)


def split_documents(sizes: Sequence[int], seed: int, val_fraction: float, test_fraction: float) -> List[List[int]]:
    """Document indices of train, validation and test: documents in a seeded random order go
    to test until it holds ``test_fraction`` of the corpus size, then to validation likewise,
    the rest to training (each split at least one document)."""
    n = len(sizes)
    if n < 3:
        raise DataError(f"lm: a corpus of {n} document(s) cannot be split by document into train/val/test (needs 3)")
    order = np.random.default_rng(seed + 2718).permutation(n).tolist()
    total = float(sum(sizes))
    out: List[List[int]] = [[], [], []]
    pos = 0
    for k, fraction in ((2, test_fraction), (1, val_fraction)):
        held = 0
        while pos < n - (2 if k == 2 else 1) and (not out[k] or held < fraction * total):
            out[k].append(order[pos])
            held += sizes[order[pos]]
            pos += 1
    out[0] = order[pos:]
    return [sorted(s) for s in out]


def cache_root() -> str:
    return os.environ.get("FASTKD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastkd")


def corpus_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        data = t.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def tokenizer_path(texts: Sequence[str], vocab_size: int) -> str:
    return os.path.join(cache_root(), "tokenizers", f"{corpus_hash(texts)}-v{vocab_size}", "tokenizer.json")


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE of ``vocab_size`` entries (``<|endoftext|>`` included) trained on
    ``texts``, loaded from the cache when it was trained before."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = tokenizer_path(texts, vocab_size)
    if os.path.isfile(path):
        return Tokenizer.from_file(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Written under a temporary name and renamed: a concurrent run reads a whole file or none.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    tok.save(tmp)
    os.replace(tmp, path)
    return tok


def load_tokenizer(path: str):
    from tokenizers import Tokenizer

    if not os.path.isfile(path):
        raise DataError(f"data.tokenizer {path} does not exist")
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # the library raises its own exception type for a bad file
        raise DataError(f"data.tokenizer {path} is not a tokenizer.json ({str(exc).splitlines()[0]})") from None


def windows(stream: np.ndarray, context: int, pad_id: int) -> Dataset:
    """Cut a token stream into ``[N, context]`` input windows; labels equal the inputs except
    the last window's padding, labelled :data:`IGNORE_INDEX`."""
    n = max(1, -(-len(stream) // context))
    x = np.full(n * context, pad_id, dtype=np.int64)
    x[: len(stream)] = stream
    y = np.full(n * context, IGNORE_INDEX, dtype=np.int64)
    y[: len(stream)] = stream
    return Dataset(torch.from_numpy(x.reshape(n, context)), torch.from_numpy(y.reshape(n, context)), (context,), 0)


@dataclass
class TextSplits:
    """Token windows of the three splits, the tokenizer and facts the summary reports."""

    train: Dataset
    val: Dataset
    test: Dataset
    tokenizer: object
    vocab_size: int
    eos_id: int
    documents: List[int]  # per split
    tokens: List[int]  # per split (real tokens, padding excluded)
    tokenizer_file: str
    name: str = "lm"
    noisy_labels: int = 0

    @property
    def input_shape(self):
        return self.train.input_shape

    @property
    def num_classes(self) -> int:
        return self.vocab_size


def load_text(d: dict, seed: int) -> TextSplits:
    """The ``[data]`` table of an ``lm`` job as token windows (see the module docstring)."""
    corpus = user_corpus(d["path"], d["tokenizer"]) if d["path"] else stdlib_corpus(d["documents"])
    given = load_tokenizer(d["tokenizer"]) if d["tokenizer"] else None
    if corpus.ids is not None:
        eos = given.token_to_id(EOS)
        if eos is None:
            raise DataError(f"data.tokenizer {d['tokenizer']} has no {EOS} token to separate the documents of {d['path']}")
        stream = corpus.ids[0]
        cuts = np.flatnonzero(stream == eos)
        docs = [p for p in np.split(stream, cuts + 1) if len(p) and not (len(p) == 1 and p[0] == eos)]
        docs = [p[:-1] if p[-1] == eos else p for p in docs]
        sizes = [len(p) for p in docs]
    else:
        sizes = [len(t.encode("utf-8")) for t in corpus.texts]
    parts = split_documents(sizes, seed, d["val_fraction"], d["test_fraction"])
    if corpus.ids is not None:
        tok, path = given, d["tokenizer"]
        split_ids = [[docs[i] for i in part] for part in parts]
    else:
        if given is not None:
            tok, path = given, d["tokenizer"]
        else:
            train_texts = [corpus.texts[i] for i in parts[0]]
            tok, path = train_tokenizer(train_texts, d["vocab_size"]), tokenizer_path(train_texts, d["vocab_size"])
        if tok.token_to_id(EOS) is None:
            raise DataError(f"data.tokenizer {path} has no {EOS} token to separate documents")
        split_ids = [[np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch([corpus.texts[i] for i in part])]
                     for part in parts]
    eos = tok.token_to_id(EOS)
    vocab = tok.get_vocab_size()
    streams = []
    for docs_ids in split_ids:
        pieces = []
        for ids in docs_ids:
            pieces += [ids, np.array([eos], dtype=np.int64)]
        streams.append(np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64))
    if streams[0].size and streams[0].max() >= vocab:
        raise DataError(f"data.path {d['path']} holds token id {int(streams[0].max())}, outside the tokenizer's vocabulary of {vocab}")
    ctx = d["context"]
    sets = [windows(s, ctx, eos) for s in streams]
    for s in sets:
        s.num_classes = vocab
    return TextSplits(*sets, tokenizer=tok, vocab_size=vocab, eos_id=eos, documents=[len(p) for p in parts],
                      tokens=[len(s) for s in streams], tokenizer_file=path)


def describe(splits: TextSplits) -> dict:
    """What the summary says about the data."""
    return {"documents": dict(zip(("train", "val", "test"), splits.documents)),
            "tokens": dict(zip(("train", "val", "test"), splits.tokens)),
            "vocab_size": splits.vocab_size, "tokenizer": splits.tokenizer_file}
