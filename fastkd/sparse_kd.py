"""`fastkd.sparse_kd_loss` / `fastkd.SparseKDLoss`: forward KL against a `SparseTeacher`.

The op sparse_kd (one per backend, fastkd/backends.py) takes [N, V] rows; this module checks the
teacher against the student, picks the backend and reduces the per-row losses.
"""
import torch

from . import _op_checks, _validate, backends
from ._reduce import reduce_rows, row_weight
from ._math import TAILS
from .sparse_teacher import KINDS, SparseTeacher


def _check_teacher(teacher, student, vocab=None):
    """The teacher's (indices [N, k] int64, logprobs [N, k] fp32, tail_logmass [N] fp32), checked
    against the student's leading shape and a vocabulary of `vocab` ids (None: the student's)."""
    if not isinstance(teacher, SparseTeacher):
        raise TypeError(f"teacher must be a fastkd.SparseTeacher (from topk_teacher or "
                        f"sample_teacher), got {type(teacher).__name__}")
    if teacher.kind not in KINDS:
        raise ValueError(f"teacher.kind must be one of {KINDS}, got {teacher.kind!r}")
    lead = tuple(student.shape[:-1])
    vocab = student.shape[-1] if vocab is None else vocab
    idx, lp, tail = teacher.indices, teacher.logprobs, teacher.tail_logmass
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"teacher.indices must be an integer tensor, got {idx.dtype}")
    if idx.dim() < 1 or tuple(idx.shape[:-1]) != lead or lp.shape != idx.shape:
        raise ValueError(f"teacher.indices {tuple(idx.shape)} and teacher.logprobs {tuple(lp.shape)} "
                         f"must both be [..., k] with the student's leading shape {lead}")
    if tuple(tail.shape) != lead:
        raise ValueError(f"teacher.tail_logmass must have the student's leading shape {lead}, got {tuple(tail.shape)}")
    k = idx.shape[-1]
    if k > vocab:
        raise ValueError(f"the teacher keeps k={k} ids per row but the student's vocabulary has V={vocab}")
    for name, x in (("indices", idx), ("logprobs", lp), ("tail_logmass", tail)):
        if x.device != student.device:
            raise ValueError(f"teacher.{name} is on {x.device} but student_logits is on {student.device}")
    if k < 1:
        raise ValueError("teacher: a sparse teacher needs k >= 1 entries per row")
    idx = idx.reshape(-1, k).long()
    lp = lp.reshape(-1, k).float()
    if idx.device.type == "cpu" and not torch.compiler.is_compiling() and idx.numel():
        why = _op_checks.sparse_values(idx, lp, tail.reshape(-1).float(), vocab, prefix="teacher.")
        if why:
            raise ValueError(why)
    return idx, lp, tail.reshape(-1).float()


def resolve_tail(tail, teacher, divergence, temperature):
    """The tail mode to run (a sampled teacher always uses renorm_teacher), after checking the
    divergence, the tail's name and that `temperature` (if given) is the teacher's."""
    if divergence != "forward_kl":
        raise ValueError(f"divergence={divergence!r}: a sparse teacher supports only 'forward_kl' "
                         "(the other divergences need the teacher's full distribution)")
    if tail not in TAILS:
        raise ValueError(f"unknown tail={tail!r}; expected one of {TAILS}")
    if temperature is not None and float(temperature) != float(teacher.temperature):
        raise ValueError(f"temperature={temperature} differs from the teacher's temperature={teacher.temperature}: "
                         "a sparse teacher's tempered distribution is fixed when it is compressed; "
                         "rebuild the teacher at the temperature you want")
    if teacher.kind == "sampled":
        if tail == "renorm_both":
            raise ValueError("tail='renorm_both' is biased for a sampled teacher; sampled KD uses 'renorm_teacher'")
        return "renorm_teacher"
    return tail


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
    if vocab_shard is not None:
        from . import distributed

        return distributed.sparse_kd_loss(vocab_shard, student_logits, teacher, tail=tail, reduction=reduction,
                                          labels=labels, ignore_index=ignore_index, hard_weight=hard_weight,
                                          scale_by_t2=scale_by_t2, temperature=temperature, divergence=divergence,
                                          vocab_size=vocab_size, backend=backend)
    _validate.check_logits("student_logits", student_logits)
    _validate.check_not_transformed(student_logits)
    student_logits, _ = _validate.vocab_columns(vocab_size, student_logits)
    _validate.check_vocab("student_logits", student_logits)
    idx, lp, tail_lp = _check_teacher(teacher, student_logits)
    t_temp = _validate.check_temperature(teacher.temperature)
    tail = resolve_tail(tail, teacher, divergence, temperature)
    _validate.check_reduction(reduction)
    flat_labels = _validate.check_labels(labels, student_logits, ignore_index, hard_weight)
    if not isinstance(scale_by_t2, bool):
        raise TypeError(f"scale_by_t2 must be a bool, got {scale_by_t2!r}")
    op = backends.kernel("sparse_kd", backend, student_logits.device)
    vocab = student_logits.shape[-1]
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    flat = student_logits.reshape(-1, vocab)
    weight = row_weight(flat_labels, ignore_index, reduction, flat.shape[0], flat.device)
    rows, _ = op(flat, idx, lp, tail_lp, flat_labels, tail, t_temp, ignore_index, float(hard_weight),
                 scale_by_t2, weight, compute_grad)
    return reduce_rows(rows, flat_labels, ignore_index, reduction, student_logits.shape[:-1])


class SparseKDLoss(torch.nn.Module):
    """Module form of `sparse_kd_loss`, with the same options and defaults.

    forward(student_logits [..., V], teacher: SparseTeacher, labels [...] or None) -> loss
    """

    def __init__(self, *, tail="bucket", reduction="mean", ignore_index=-100, hard_weight=0.0,
                 scale_by_t2=True, temperature=None, divergence="forward_kl", vocab_size=None, vocab_shard=None,
                 backend="auto"):
        super().__init__()
        if tail not in TAILS:
            raise ValueError(f"unknown tail={tail!r}; expected one of {TAILS}")
        _validate.check_reduction(reduction)
        self.options = dict(tail=tail, reduction=reduction, ignore_index=ignore_index,
                            hard_weight=hard_weight, scale_by_t2=scale_by_t2,
                            temperature=temperature, divergence=divergence, vocab_size=vocab_size,
                            vocab_shard=vocab_shard, backend=backend)

    def forward(self, student_logits, teacher, labels=None):
        return sparse_kd_loss(student_logits, teacher, labels=labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
