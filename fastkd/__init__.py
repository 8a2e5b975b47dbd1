"""fastkd: knowledge-distillation losses as fused kernels, and an engine to run distillation.

Import one loss as a drop-in replacement::

    import fastkd
    loss = fastkd.kd_loss(student_logits, teacher_logits, temperature=2.0)
    criterion = fastkd.nn.KDLoss(temperature=2.0)
    loss = fastkd.dkd_loss(student_logits, teacher_logits, labels, temperature=4.0, alpha=1.0, beta=8.0)
    hint = fastkd.hint_loss(regressor(student_feat), teacher_feat, kind="mse")
    at = fastkd.attention_transfer_loss([s3, s4], [t3, t4])   # summed over the pairs
"""

from fastkd import nn
from fastkd._ext import empty_cache
from fastkd.functional import (
    attention_transfer_loss,
    dkd_loss,
    fused_linear_kd_loss,
    hint_loss,
    kd_loss,
    kd_loss_reference,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    sp_loss,
    sparse_kd_loss,
)
from fastkd.functional import LOSSES

__version__ = "0.1.0"
__all__ = list(LOSSES) + ["kd_loss_reference", "nn", "empty_cache", "__version__"]
