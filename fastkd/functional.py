"""The functional API: every fastkd loss as a function of tensors."""

from fastkd.ops.fused_linear import fused_linear_kd_loss, fused_linear_kd_loss_reference
from fastkd.ops.dkd import dkd_loss, dkd_loss_reference
from fastkd.ops.kd import kd_loss, kd_loss_reference
from fastkd.ops.relational import (
    pkt_loss,
    pkt_loss_reference,
    rkd_angle_loss,
    rkd_angle_loss_reference,
    rkd_distance_loss,
    rkd_distance_loss_reference,
    sp_loss,
    sp_loss_reference,
)

__all__ = ["kd_loss", "kd_loss_reference", "fused_linear_kd_loss", "fused_linear_kd_loss_reference"]
__all__ = [
    "kd_loss",
    "kd_loss_reference",
    "rkd_distance_loss",
    "rkd_distance_loss_reference",
    "rkd_angle_loss",
    "rkd_angle_loss_reference",
    "sp_loss",
    "sp_loss_reference",
    "pkt_loss",
    "pkt_loss_reference",
]
__all__ = ["kd_loss", "kd_loss_reference", "dkd_loss", "dkd_loss_reference"]
from fastkd.ops.sparse_kd import sparse_kd_loss, sparse_kd_loss_reference

__all__ = ["kd_loss", "kd_loss_reference", "sparse_kd_loss", "sparse_kd_loss_reference"]
