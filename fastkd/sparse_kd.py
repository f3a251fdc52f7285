"""`fastkd.sparse_kd_loss` / `fastkd.SparseKDLoss`: forward KL against a `SparseTeacher`.

The op sparse_kd (one per backend, fastkd/backends.py) takes [N, V] rows; this module checks the
teacher against the student, picks the backend and reduces the per-row losses.
"""
import torch

from . import _validate, backends
from ._options import as_options, loss_options, with_teacher
from ._reduce import reduce_rows, row_weight


def sparse_kd_loss(student_logits, teacher, *, tail="bucket", reduction="mean", labels=None,
                   ignore_index=-100, hard_weight=0.0, scale_by_t2=True, temperature=None,
                   divergence="forward_kl", vocab_size=None, vocab_shard=None, backend="auto"):
    """Forward-KL distillation loss of `student_logits` [..., V] against a sparse teacher.

    teacher: a SparseTeacher from fastkd.topk_teacher / fastkd.sample_teacher, [..., k].
    tail: "bucket" (exact KL of the (k+1)-bin coarsenings) | "renorm_teacher" | "renorm_both";
        a "sampled" teacher always uses "renorm_teacher" (unbiased gradient), and refuses
        "renorm_both".
    temperature: the teacher's (fixed when it was compressed); passing another value is an error.
    divergence: only "forward_kl" is defined for sparse teachers.
    vocab_size: run over the student's first V columns (a padded LM head); teacher ids must be < V.
    vocab_shard: a fastkd.distributed.VocabShard when student_logits is this rank's slice
        [..., V_r] of a vocabulary split over ranks; the teacher's ids are global (docs/distributed.md).
    Other options as in fastkd.kd_loss. Returns a float32 loss in nats (float64 for fp64 logits).
    """
    options = dict(temperature=temperature, divergence=divergence, reduction=reduction, tail=tail,
                   ignore_index=ignore_index, hard_weight=hard_weight, scale_by_t2=scale_by_t2, vocab_size=vocab_size,
                   backend=backend, sparse=True)
    return sparse_loss(student_logits, teacher, labels, options, vocab_shard)


def sparse_loss(student_logits, teacher, labels, options, vocab_shard=None):
    """sparse_kd_loss with its options: a LossOptions or loss_options' arguments (as_options; inside the
    vocab-parallel agreement, so a bad option on one rank is raised on every rank)."""
    if vocab_shard is not None or _validate.is_dtensor(student_logits):
        from . import distributed

        if _validate.is_dtensor(student_logits):  # tensor parallelism: the shard from the placement
            local, teacher, shard, mesh = distributed.dtensor_rows("sparse", student_logits, teacher, vocab_shard)
            return distributed.replicated(sparse_loss(local, teacher, labels, options, shard), mesh)
        return distributed.sparse_kd_loss(vocab_shard, student_logits, teacher, labels, options)
    o = as_options(options)
    _validate.check_logits("student_logits", student_logits)
    _validate.check_not_transformed(student_logits)
    student_logits, _ = _validate.vocab_columns(o.vocab_size, student_logits)
    _validate.check_vocab("student_logits", student_logits)
    idx, lp, tail_lp = _validate.check_sparse_teacher(teacher, student_logits)
    o = with_teacher(o, teacher)
    flat_labels = _validate.check_labels(labels, student_logits, o)
    op = backends.kernel("sparse_kd", o.backend, student_logits.device)
    vocab = student_logits.shape[-1]
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    flat = student_logits.reshape(-1, vocab)
    weight = row_weight(flat_labels, o.ignore_index, o.reduction, flat.shape[0], flat.device)
    rows, _ = op(flat, idx, lp, tail_lp, flat_labels, o.tail, o.temperature, o.ignore_index, o.hard_weight,
                 o.scale_by_t2, weight, compute_grad)
    return reduce_rows(rows, flat_labels, o.ignore_index, o.reduction, student_logits.shape[:-1])


class SparseKDLoss(torch.nn.Module):
    """Module form of `sparse_kd_loss`, with the same options and defaults.

    forward(student_logits [..., V], teacher: SparseTeacher, labels [...] or None) -> loss
    """

    def __init__(self, *, tail="bucket", reduction="mean", ignore_index=-100, hard_weight=0.0,
                 scale_by_t2=True, temperature=None, divergence="forward_kl", vocab_size=None, vocab_shard=None,
                 backend="auto"):
        super().__init__()
        # checked once, at construction, and kept (the teacher's temperature and kind: per call)
        self.options = loss_options(temperature=temperature, divergence=divergence, reduction=reduction, tail=tail,
                                    ignore_index=ignore_index, hard_weight=hard_weight, scale_by_t2=scale_by_t2,
                                    vocab_size=vocab_size, backend=backend, sparse=True)
        self.vocab_shard = vocab_shard

    def forward(self, student_logits, teacher, labels=None):
        return sparse_loss(student_logits, teacher, labels, self.options, self.vocab_shard)

    def extra_repr(self) -> str:
        shard = "" if self.vocab_shard is None else f", vocab_shard={self.vocab_shard!r}"
        return self.options.describe(exclude=("beta",)) + shard
