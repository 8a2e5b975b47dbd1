"""Small classifiers for the engine, and access to their modules by path.

Every model has the same named parts so that configs can address them: ``stem`` (input to the
first hidden representation), ``blocks.0`` … ``blocks.{n-1}`` (the hidden stages) and ``head``
(the classifier). Feature losses and stagewise KD name modules by these dotted paths (any path
that ``model.get_submodule`` accepts works, e.g. ``blocks.0.0`` for a block's first layer).
"""

from __future__ import annotations

import math
import os
from typing import Sequence, Tuple

import torch
from torch import nn


class MLP(nn.Module):
    """``stem``: Linear(in, h0)+ReLU; ``blocks.i``: Linear(h_i, h_{i+1})+ReLU(+Dropout);
    ``head``: Linear(h_last, classes). Input ``[B, ...]`` is flattened."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int], dropout: float = 0.0):
        super().__init__()
        d_in = int(math.prod(input_shape))
        drop = [nn.Dropout(dropout)] if dropout > 0 else []
        self.stem = nn.Sequential(nn.Linear(d_in, hidden[0]), nn.ReLU(), *drop)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.ReLU(), *([nn.Dropout(dropout)] if dropout > 0 else []))
            for a, b in zip(hidden[:-1], hidden[1:])
        )
        self.head = nn.Linear(hidden[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x.flatten(1))
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class ConvNet(nn.Module):
    """A tiny convnet for ``(C, H, W)`` inputs. ``stem``: 3x3 conv + BN-free ReLU;
    ``blocks.i``: 3x3 conv + ReLU (+2x2 max-pool on odd-numbered blocks); ``head``: global average
    pool then Linear. Flat inputs ``[B, C*H*W]`` are reshaped to ``input_shape``."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int], dropout: float = 0.0):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"arch 'cnn' needs image inputs (C, H, W), this dataset has input shape {tuple(input_shape)}")
        self.input_shape = tuple(input_shape)
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], channels[0], 3, padding=1), nn.ReLU())
        blocks = []
        for i, (a, b) in enumerate(zip(channels[:-1], channels[1:])):
            layers = [nn.Conv2d(a, b, 3, padding=1), nn.ReLU()]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x.reshape(x.shape[0], *self.input_shape))
        for block in self.blocks:
            h = block(h)
        return self.head(h)


ARCHS = ("mlp", "cnn", "gpt2")


def _offline_transformers():
    """Import ``transformers`` with the hub switched off: a model is built from its config or
    read from a local directory, and nothing may ever be downloaded."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    # Its loading bars would break the engine's one-line errors and clutter the job's output.
    transformers.logging.disable_progress_bar()
    return transformers


def build_gpt2(spec: dict, vocab_size: int, context: int, eos_id: int, seed: int) -> nn.Module:
    """A GPT-2 language model (``GPT2LMHeadModel``): from ``spec["path"]``, a local
    ``from_pretrained`` directory, or built from the config keys with a random initialisation
    from ``seed``. Raises ``ValueError`` for a directory that holds no model, a head width that
    does not divide, and ``LookupError`` when the model's vocabulary or context does not fit
    the data (``vocab_size`` tokens, windows of ``context``)."""
    tf = _offline_transformers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec["path"]:
            if not os.path.isfile(os.path.join(spec["path"], "config.json")):
                raise ValueError(f"path {spec['path']} is not a from_pretrained directory (no config.json)")
            try:
                # No code from the directory runs, and its weights are read without unpickling:
                # safetensors when it has them (transformers prefers model.safetensors), else
                # pytorch_model.bin through torch.load(weights_only=True).
                model = tf.GPT2LMHeadModel.from_pretrained(spec["path"], local_files_only=True, trust_remote_code=False)
            except (OSError, ValueError) as exc:
                raise ValueError(f"path {spec['path']}: cannot load a GPT-2 model ({str(exc).splitlines()[0]})") from None
        else:
            if spec["n_embd"] % spec["n_head"]:
                raise ValueError(f"n_embd={spec['n_embd']} must be a multiple of n_head={spec['n_head']}")
            p = spec["dropout"]
            config = tf.GPT2Config(
                vocab_size=vocab_size, n_positions=spec["n_positions"] or context, n_embd=spec["n_embd"],
                n_layer=spec["n_layer"], n_head=spec["n_head"], resid_pdrop=p, embd_pdrop=p, attn_pdrop=p,
                bos_token_id=eos_id, eos_token_id=eos_id,
            )
            model = tf.GPT2LMHeadModel(config)
    if model.config.vocab_size != vocab_size:
        raise LookupError(f"the model's vocabulary has {model.config.vocab_size} entries, the tokenizer's {vocab_size}")
    if model.config.n_positions < context:
        raise LookupError(f"data.context={context} is longer than the model's context of {model.config.n_positions} tokens")
    return model


def build_model(spec: dict, input_shape: Tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """A model from a ``[teacher]``/``[student]`` config table, initialised from ``seed`` alone
    (so that the same seed gives the same weights whatever ran before)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec["arch"] == "mlp":
            return MLP(input_shape, num_classes, spec["hidden"], spec["dropout"])
        if spec["arch"] == "cnn":
            return ConvNet(input_shape, num_classes, spec["channels"], spec["dropout"])
    raise ValueError(f"unknown arch {spec['arch']!r}")


def module_paths(model: nn.Module) -> list:
    """Dotted paths of every named submodule (``""`` the model itself excluded)."""
    return [name for name, _ in model.named_modules() if name]


def get_module(model: nn.Module, path: str, what: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that names ``what`` and the available paths."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        top = ", ".join(p for p in module_paths(model) if p.count(".") <= 1)
        raise LookupError(f"module path {path!r} does not exist in the {what} model (its modules: {top})") from None
