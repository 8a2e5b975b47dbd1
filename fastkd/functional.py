"""The functional API: every fastkd loss as a function of tensors, with its reference.

The losses are those of the op table (``fastkd/ops/table.py``), in its order: each ``<name>``
and ``<name>_reference``.
"""

from fastkd.ops import table

LOSSES = tuple(op.name for op in table.all_ops())
globals().update({op.name: op.function for op in table.all_ops()})
globals().update({f"{op.name}_reference": op.reference for op in table.all_ops()})
__all__ = list(LOSSES) + [f"{name}_reference" for name in LOSSES]
