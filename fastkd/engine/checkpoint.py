"""Atomic checkpoint files, model files, and the random-number-generator state they carry.

A checkpoint is written to a temporary file in the same directory, flushed and fsync'ed, then
renamed over the previous one (and the directory fsync'ed), so that a process killed at any
instant (SIGKILL included) leaves either the old or the new checkpoint, never a torn one.

Nothing fastkd reads can run code. A checkpoint holds tensors and plain data only (numbers,
strings, lists, dicts; the Python and NumPy RNG states as tensors) and is read with
``torch.load(weights_only=True)``, which refuses anything else. A model file
(``runs/<run>/models/<name>.safetensors``) is safetensors: tensors and a JSON header, nothing
to unpickle. Every refusal, like a damaged file, is a :class:`CheckpointError` naming the file
and saying why in one line.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import tempfile
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from fastkd.engine.schema import ConfigError

# What a checkpoint says it is. Runs written before the safe format (version 1: pickled
# NumPy RNG state, read with a full unpickler) have neither key and are not resumed.
FORMAT = "fastkd-checkpoint"
FORMAT_VERSION = 2
MODEL_FORMAT = "fastkd-model"
MODEL_SUFFIX = ".safetensors"


class CheckpointError(ConfigError):
    """A checkpoint or model file fastkd will not or cannot load (one line: the file and why;
    exit status 2, like a configuration problem)."""


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync dir)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save(path: str, state: dict) -> None:
    """``torch.save`` ``state`` (tensors and plain data only) to ``path`` atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _refusal(exc: BaseException) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f"unpickling it would call {found.group(1)}" if found else "it holds objects other than tensors and plain data"
    return f"refused: {what}, which a weights-only load does not allow (such a file can run code when loaded)"


def _torch_load(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU; every failure a one-line
    :class:`CheckpointError` naming the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the file was cut off or never written")
    with open(path, "rb") as f:
        head = f.read(4)
    zipped = head == b"PK\x03\x04"  # torch.save's format; its legacy one is a pickle (protocol 2+: 0x80)
    if not zipped and not head.startswith(b"\x80"):
        raise CheckpointError(f"{path} is not a PyTorch file (neither torch.save's zip archive nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise CheckpointError(f"{path}: {_refusal(exc)}") from None
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable pickle"
        raise CheckpointError(f"{path} is damaged ({why})") from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many kinds for damaged bytes
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if zipped:
            # A zip archive cut short has lost its central directory, at the end of the file.
            raise CheckpointError(f"{path} is truncated or damaged: PyTorch cannot read it as a checkpoint archive "
                                  f"({first.split('. ')[0]})") from None
        raise CheckpointError(f"{path} is not a readable PyTorch file ({type(exc).__name__}: {first[:120]})") from None


def load(path: str) -> dict:
    """A checkpoint written by :func:`save`, read with ``weights_only=True`` (onto the CPU)."""
    state = _torch_load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint")
    return state


def stamp(state: dict) -> dict:
    """``state`` marked as a checkpoint of the safe format (what :func:`check_format` expects)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **state}


def check_format(path: str, state: dict) -> None:
    """Refuse a checkpoint that is not of this fastkd's safe format."""
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} predates fastkd's safe checkpoint format (or is not a fastkd checkpoint): "
                              "it cannot be resumed; start a new run")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is checkpoint format version {state.get('format_version')!r}; this fastkd reads "
                              f"version {FORMAT_VERSION}")


# -- model files -----------------------------------------------------------------------------------


def model_bytes(role: str, state: Dict[str, torch.Tensor]) -> bytes:
    """A model's weights as safetensors bytes; its role in the header's one metadata key (one
    key: safetensors orders several differently from process to process)."""
    from safetensors.torch import save

    tensors, seen = {}, set()
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        # Tied weights (a language model's lm_head and embedding) share memory, which
        # safetensors refuses: each is stored in full, and load_state_dict ties them again.
        if key in seen:
            t = t.clone()
        seen.add(key)
        tensors[name] = t
    meta = json.dumps({"format": MODEL_FORMAT, "version": 1, "role": role}, sort_keys=True)
    return save(tensors, metadata={"fastkd": meta})


def save_model(path: str, role: str, state: Dict[str, torch.Tensor]) -> None:
    """Write a model file (safetensors) atomically."""
    atomic_write_bytes(path, model_bytes(role, state))


def _is_safetensors(path: str) -> bool:
    # An 8-byte little-endian header length, then the JSON header.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= os.path.getsize(path) - 8


def load_model(path: str) -> Tuple[Optional[str], Dict[str, torch.Tensor]]:
    """``(role or None, state dict)`` of a model file: safetensors (a fastkd run's
    ``models/<name>.safetensors``, or any flat tensor file), or a ``.pt`` holding a state dict
    or ``{"state": state dict, ...}`` read with ``weights_only=True``. Anything else, or a
    refused load, is a one-line :class:`CheckpointError`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    if _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors' own errors; one line either way
            raise CheckpointError(f"{path} is not a readable safetensors file ({str(exc).strip().splitlines()[0]})") from None
        try:
            role = json.loads(meta.get("fastkd", "{}")).get("role")
        except (ValueError, AttributeError):
            role = None
        return role, state
    obj = _torch_load(path)
    role = None
    if isinstance(obj, dict) and isinstance(obj.get("state"), dict):
        role, obj = obj.get("role"), obj["state"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise CheckpointError(f"{path} holds no model weights (expected a state dict of tensors, or a safetensors file)")
    return role if isinstance(role, str) else None, obj


# -- random-number generators ------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's RNG states: Python, NumPy, torch CPU (and CUDA when present), as tensors
    and plain numbers (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
