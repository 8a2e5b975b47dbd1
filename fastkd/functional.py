"""The functional API: every fastkd loss as a function of tensors."""

from fastkd.ops.kd import kd_loss, kd_loss_reference
from fastkd.ops.sparse_kd import sparse_kd_loss, sparse_kd_loss_reference

__all__ = ["kd_loss", "kd_loss_reference", "sparse_kd_loss", "sparse_kd_loss_reference"]
