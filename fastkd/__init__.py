"""fastkd: knowledge-distillation losses as fused kernels, and an engine to run distillation.

Import one loss as a drop-in replacement::

    import fastkd
    loss = fastkd.kd_loss(student_logits, teacher_logits, temperature=2.0)
    criterion = fastkd.nn.KDLoss(temperature=2.0)
    loss = fastkd.dkd_loss(student_logits, teacher_logits, labels, temperature=4.0, alpha=1.0, beta=8.0)
"""

from fastkd import nn
from fastkd._ext import empty_cache
from fastkd.functional import fused_linear_kd_loss, kd_loss, kd_loss_reference

__version__ = "0.1.0"
__all__ = ["kd_loss", "kd_loss_reference", "fused_linear_kd_loss", "nn", "empty_cache", "__version__"]
from fastkd.functional import kd_loss, kd_loss_reference
from fastkd.functional import pkt_loss, rkd_angle_loss, rkd_distance_loss, sp_loss

__version__ = "0.1.0"
__all__ = [
    "kd_loss",
    "kd_loss_reference",
    "rkd_distance_loss",
    "rkd_angle_loss",
    "sp_loss",
    "pkt_loss",
    "nn",
    "empty_cache",
    "__version__",
]
from fastkd.functional import dkd_loss, dkd_loss_reference, kd_loss, kd_loss_reference

__version__ = "0.1.0"
__all__ = ["kd_loss", "kd_loss_reference", "dkd_loss", "dkd_loss_reference", "nn", "empty_cache", "__version__"]
from fastkd.functional import kd_loss, kd_loss_reference, sparse_kd_loss, sparse_kd_loss_reference

__version__ = "0.1.0"
__all__ = ["kd_loss", "kd_loss_reference", "sparse_kd_loss", "sparse_kd_loss_reference", "nn", "empty_cache", "__version__"]
