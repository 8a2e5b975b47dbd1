"""The functional API: every fastkd loss as a function of tensors."""

from fastkd.ops.fused_linear import fused_linear_kd_loss, fused_linear_kd_loss_reference
from fastkd.ops.kd import kd_loss, kd_loss_reference

__all__ = ["kd_loss", "kd_loss_reference", "fused_linear_kd_loss", "fused_linear_kd_loss_reference"]
