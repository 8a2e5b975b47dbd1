"""The config vocabulary: the error a bad config raises and the typed key it is checked by.

A module of its own because both the config schema (:mod:`fastkd.engine.config`) and the loss
terms, which declare their own keys (:mod:`fastkd.engine.losses`), speak it; neither needs the
other to do so.
"""

from __future__ import annotations

from typing import Any


class ConfigError(Exception):
    """A configuration problem, reported by the CLI as one line and exit status 2."""


class Field:
    """One config key: its type, default and constraints.

    ``kind`` is one of ``int``, ``float`` (ints accepted), ``bool``, ``str``, ``list_int``,
    ``list_str``, ``list_float``. ``choices`` restricts strings; ``lo``/``hi`` bound numbers
    (inclusive unless ``lo_open``).
    """

    def __init__(self, kind: str, default: Any, *, choices=None, lo=None, hi=None, lo_open=False, doc=""):
        self.kind, self.default, self.choices = kind, default, choices
        self.lo, self.hi, self.lo_open, self.doc = lo, hi, lo_open, doc

    def check(self, key: str, value: Any) -> Any:
        names = {"int": "an integer", "float": "a number", "bool": "a boolean (true/false)", "str": "a string",
                 "list_int": "a list of integers", "list_str": "a list of strings", "list_float": "a list of numbers"}
        ok = {
            "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "bool": lambda v: isinstance(v, bool),
            "str": lambda v: isinstance(v, str),
            "list_int": lambda v: isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v),
            "list_str": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
            "list_float": lambda v: isinstance(v, list)
            and all(isinstance(i, (int, float)) and not isinstance(i, bool) for i in v),
        }[self.kind]
        if not ok(value):
            raise ConfigError(f"{key} must be {names[self.kind]}, got {type(value).__name__} {value!r}")
        if self.kind == "float":
            value = float(value)
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, self.choices))}, got {value!r}")
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
                    raise ConfigError(f"{key} must be {'>' if self.lo_open else '>='} {self.lo}, got {v!r}")
                if self.hi is not None and v > self.hi:
                    raise ConfigError(f"{key} must be <= {self.hi}, got {v!r}")
        if self.kind.startswith("list") and not value and self.lo is not None:
            raise ConfigError(f"{key} must not be empty")
        return value
