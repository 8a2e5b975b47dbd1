"""fastkd: knowledge-distillation losses as fused kernels, and an engine to run distillation.

Import one loss as a drop-in replacement::

    import fastkd
    loss = fastkd.kd_loss(student_logits, teacher_logits, temperature=2.0)
    criterion = fastkd.nn.KDLoss(temperature=2.0)
"""

from fastkd import nn
from fastkd._ext import empty_cache
from fastkd.functional import kd_loss, kd_loss_reference, sparse_kd_loss, sparse_kd_loss_reference

__version__ = "0.1.0"
__all__ = ["kd_loss", "kd_loss_reference", "sparse_kd_loss", "sparse_kd_loss_reference", "nn", "empty_cache", "__version__"]
