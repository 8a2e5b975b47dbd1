"""The functional API: every fastkd loss as a function of tensors."""

from fastkd.ops.dkd import dkd_loss, dkd_loss_reference
from fastkd.ops.kd import kd_loss, kd_loss_reference

__all__ = ["kd_loss", "kd_loss_reference", "dkd_loss", "dkd_loss_reference"]
