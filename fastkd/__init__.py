"""fastkd: knowledge-distillation losses as fused kernels, and an engine to run distillation.

Import one loss as a drop-in replacement::

    import fastkd
    loss = fastkd.kd_loss(student_logits, teacher_logits, temperature=2.0)
    criterion = fastkd.nn.KDLoss(temperature=2.0)
    loss = fastkd.dkd_loss(student_logits, teacher_logits, labels, temperature=4.0, alpha=1.0, beta=8.0)
    hint = fastkd.hint_loss(regressor(student_feat), teacher_feat, kind="mse")
    at = fastkd.attention_transfer_loss([s3, s4], [t3, t4])   # summed over the pairs
"""

from fastkd import functional, nn
from fastkd._ext import empty_cache
from fastkd.functional import *  # noqa: F401,F403  every loss and its reference (functional.__all__)

__version__ = "0.1.0"
__all__ = list(functional.__all__) + ["nn", "empty_cache", "__version__"]
