"""`fastkd.kd_loss` / `fastkd.KDLoss`: KD loss against a dense teacher, loss and gradient in one pass.

The op dense_kd (one per backend, fastkd/backends.py) takes [N, V] rows; this module flattens the
leading shape, checks the arguments, picks the backend and reduces the per-row losses.
"""
import torch

from . import _validate, backends
from ._options import as_options, loss_options
from ._reduce import reduce_rows, row_weight


def kd_loss(student_logits, teacher_logits, *, temperature=1.0, divergence="forward_kl", beta=0.5,
            reduction="mean", labels=None, ignore_index=-100, hard_weight=0.0, scale_by_t2=True,
            vocab_size=None, vocab_shard=None, backend="auto"):
    """Knowledge-distillation loss of `student_logits` against `teacher_logits`.

    student_logits, teacher_logits: [..., V] logits of one float dtype (fp32, bf16, fp16, fp64).
    temperature: T > 0; both distributions are softmax(logits / T).
    divergence: "forward_kl" | "reverse_kl" | "jsd" | "skew_forward_kl" | "skew_reverse_kl" | "tvd";
        beta weighs "jsd" (in (0, 1)) and the skew KLs (in [0, 1)).
    labels: [...] integer class ids or None; rows equal to `ignore_index` are ignored.
    hard_weight: w in [0, 1]; row loss = (1 - w) KD + w CE(softmax(student), labels).
    scale_by_t2: multiply the KD term by T^2 (Hinton's convention).
    reduction: "mean" over kept rows | "sum" | "none" (the leading shape, 0 at ignored rows).
    vocab_size: V for LM heads padded past one tokenizer's vocabulary (e.g. 152064 vs 151936):
        the loss runs over the first V columns of each side; later columns get zero gradient.
    vocab_shard: a fastkd.distributed.VocabShard when the logits are this rank's slice [..., V_r]
        of a vocabulary split over ranks (tensor-parallel heads): the loss is the whole rows' (the
        same on every rank), the gradient this slice's; labels are global ids (docs/distributed.md).
        A DTensor student_logits sharded on V (tensor parallelism) needs none: the shard is its
        placement's, and the loss a replicated DTensor.
    backend: "auto" | "torch" | "cpu" | ... (see fastkd.available_backends()).

    Returns a float32 loss (float64 for float64 logits), in nats. The gradient with respect to
    `student_logits` (in its dtype) is computed in this call and kept; backward only scales it.
    See docs/math.md for the exact definitions.
    """
    options = dict(temperature=temperature, divergence=divergence, beta=beta, reduction=reduction,
                   ignore_index=ignore_index, hard_weight=hard_weight, scale_by_t2=scale_by_t2, vocab_size=vocab_size,
                   backend=backend)
    return dense_loss(student_logits, teacher_logits, labels, options, vocab_shard)


def dense_loss(student_logits, teacher_logits, labels, options, vocab_shard=None):
    """kd_loss with its options: a LossOptions, or loss_options' arguments (checked by as_options --
    inside the vocab-parallel guard, so a bad option on one rank is raised on every rank)."""
    if vocab_shard is not None or _validate.is_dtensor(student_logits):
        from . import distributed

        if _validate.is_dtensor(student_logits):  # tensor parallelism: the shard from the placement
            local, teacher, shard, mesh = distributed.dtensor_rows("dense", student_logits, teacher_logits, vocab_shard)
            return distributed.replicated(dense_loss(local, teacher, labels, options, shard), mesh)
        return distributed.kd_loss(vocab_shard, student_logits, teacher_logits, labels, options)
    o = as_options(options)
    student_logits, teacher_logits = _validate.vocab_columns(o.vocab_size, student_logits, teacher_logits)
    _validate.check_pair(student_logits, teacher_logits)
    _validate.check_vocab("student_logits", student_logits)  # (a vocab-parallel rank may hold V_r = 0)
    flat_labels = _validate.check_labels(labels, student_logits, o)
    op = backends.kernel("dense_kd", o.backend, student_logits.device)
    vocab = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    flat = student_logits.reshape(-1, vocab)
    weight = row_weight(flat_labels, o.ignore_index, o.reduction, flat.shape[0], flat.device)
    rows, _ = op(flat, teacher_logits.reshape(-1, vocab).detach(), flat_labels, o.divergence, o.temperature,
                 o.beta, o.ignore_index, o.hard_weight, o.scale_by_t2, weight, compute_grad)
    return reduce_rows(rows, flat_labels, o.ignore_index, o.reduction, lead)


class KDLoss(torch.nn.Module):
    """Module form of `kd_loss`, with the same options and defaults.

    forward(student_logits [..., V], teacher_logits [..., V], labels [...] or None) -> loss
    """

    def __init__(self, *, temperature=1.0, divergence="forward_kl", beta=0.5, reduction="mean",
                 ignore_index=-100, hard_weight=0.0, scale_by_t2=True, vocab_size=None, vocab_shard=None,
                 backend="auto"):
        super().__init__()
        # checked once, at construction (not at the first batch), and kept
        self.options = loss_options(temperature=temperature, divergence=divergence, beta=beta, reduction=reduction,
                                    ignore_index=ignore_index, hard_weight=hard_weight, scale_by_t2=scale_by_t2,
                                    vocab_size=vocab_size, backend=backend)
        self.vocab_shard = vocab_shard

    def forward(self, student_logits, teacher_logits, labels=None):
        return dense_loss(student_logits, teacher_logits, labels, self.options, self.vocab_shard)

    def extra_repr(self) -> str:
        shard = "" if self.vocab_shard is None else f", vocab_shard={self.vocab_shard!r}"
        return self.options.describe(exclude=("tail",)) + shard
