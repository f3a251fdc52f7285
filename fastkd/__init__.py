"""fastkd: fused knowledge-distillation losses for large-vocabulary language models.

    loss = fastkd.kd_loss(student_logits, teacher_logits, temperature=2.0)

See README.md for the quick start and docs/ for the math and the backends.
"""
from . import _ops

_ops.define_ops()  # the op schemas, before any kernel registers (fastkd._C, below)
from . import _ext  # noqa: F401  (loads fastkd._C when built; reports it once when not)
from ._math import DIVERGENCES
from .backends import available_backends
from .dense_kd import KDLoss, kd_loss
from .sparse_kd import SparseKDLoss, sparse_kd_loss
from .fused_linear_kd import FusedLinearKDLoss, fused_linear_kd_loss
from ._metrics import KDMetrics
from .on_policy import sampled_reverse_kl
from .sparse_teacher import SparseTeacher, draws_for_unique, expected_unique, sample_teacher, topk_teacher
from ._version import __version__
from . import cache  # noqa: E402  (fastkd.cache: the on-disk teacher cache)
from . import distributed  # noqa: E402  (fastkd.distributed: VocabShard, vocab-parallel losses)
__all__ = [
    "kd_loss", "KDLoss", "sparse_kd_loss", "SparseKDLoss", "SparseTeacher", "topk_teacher",
    "sample_teacher", "draws_for_unique", "expected_unique", "fused_linear_kd_loss", "FusedLinearKDLoss",
    "KDMetrics", "sampled_reverse_kl",
    "available_backends", "DIVERGENCES",
    "cache", "distributed", "__version__",
]


def __getattr__(name):
    """fastkd.hf on first use (it imports transformers, which `import fastkd` does not)."""
    if name == "hf":
        import importlib

        return importlib.import_module("fastkd.hf")
    raise AttributeError(f"module 'fastkd' has no attribute {name!r}")
