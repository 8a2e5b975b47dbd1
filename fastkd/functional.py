"""The functional API: every fastkd loss as a function of tensors."""

from fastkd.ops.feature import (
    attention_transfer_loss,
    attention_transfer_loss_reference,
    hint_loss,
    hint_loss_reference,
)
from fastkd.ops.kd import kd_loss, kd_loss_reference

__all__ = [
    "kd_loss",
    "kd_loss_reference",
    "hint_loss",
    "hint_loss_reference",
    "attention_transfer_loss",
    "attention_transfer_loss_reference",
]
