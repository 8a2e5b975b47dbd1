"""The functional API: every fastkd loss as a function of tensors, with its reference."""

from fastkd.ops.dkd import dkd_loss, dkd_loss_reference
from fastkd.ops.feature import attention_transfer_loss, attention_transfer_loss_reference, hint_loss, hint_loss_reference
from fastkd.ops.fused_linear import fused_linear_kd_loss, fused_linear_kd_loss_reference
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
from fastkd.ops.sparse_kd import sparse_kd_loss, sparse_kd_loss_reference

LOSSES = (
    "kd_loss", "dkd_loss", "sparse_kd_loss", "fused_linear_kd_loss", "hint_loss", "attention_transfer_loss",
    "rkd_distance_loss", "rkd_angle_loss", "sp_loss", "pkt_loss",
)
__all__ = list(LOSSES) + [f"{name}_reference" for name in LOSSES]
