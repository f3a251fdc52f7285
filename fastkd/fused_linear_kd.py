"""`fastkd.fused_linear_kd_loss` / `fastkd.FusedLinearKDLoss`: KD straight from the last hidden
states and the LM head, never holding the [N, V] student logits (docs/design.md 1).

The rows are taken a chunk at a time: the chunk's student logits h_c W^T (+ b, soft-capped) go
into one [chunk, V] buffer reused for every chunk, the teacher's logits for the chunk (its own
hidden states and head, under no_grad, or rows of a SparseTeacher) beside them, and the fused row
op of the chosen backend (dense_kd or sparse_kd) turns them into the loss and the logits'
gradient G. Then grad_hidden[c] = G W and grad_weight += G^T h_c, grad_bias += sum G, accumulated
in fp32 for 16-bit weights (the loop: fastkd/_fused_loop.py). So the three GEMMs of a linear
layer run once each, in the forward pass; backward only scales (the kept-gradient autograd,
fastkd/_autograd.py). (With reduction "none" the upstream gradient differs per row, which grad_w
and grad_b, sums over the rows, cannot take after the fact: the forward keeps only the loss and
backward runs the chunk loop again.)

chunk_size=None picks the chunk so that the per-chunk [chunk, V] buffers -- student logits,
teacher logits and the op's gradient, fp32 when upcast -- take about 1/8 of the device's free
memory (CUDA: torch.cuda.mem_get_info), or 256 MiB on the CPU, between 1 and N rows; see
`auto_chunk_rows`.
"""

import torch

from . import _validate
from ._fused_loop import Chunked, Heads, auto_chunk_rows, check_heads, row_op, run
from ._metrics import ChunkMetrics
from ._options import as_options, loss_options, with_teacher


def fused_linear_kd_loss(student_hidden, student_weight, *, student_bias=None, teacher_hidden=None,
                         teacher_weight=None, teacher_bias=None, teacher=None, softcap=None, chunk_size=None,
                         temperature=None, divergence="forward_kl", beta=0.5, tail="bucket", reduction="mean",
                         labels=None, ignore_index=-100, hard_weight=0.0, scale_by_t2=True, vocab_size=None,
                         vocab_shard=None, backend="auto", return_metrics=False):
    """KD loss of the student's LM head on its hidden states, without the [N, V] logits.

    student_hidden [..., H]; student_weight [V_s, H] (the LM head, nn.Linear's layout);
    student_bias [V_s] or None. The teacher is either dense -- teacher_hidden [..., H_t],
    teacher_weight [V_t, H_t], teacher_bias [V_t] or None, used under no_grad -- or `teacher`, a
    SparseTeacher [..., k] (forward KL with `tail`, at the teacher's temperature). teacher_weight
    may also be the teacher's head as a module (a quantised Linear, ...): it runs on a chunk of
    rows at a time, never on the whole [N, V].
    temperature: T > 0 for a dense teacher (None: 1); a sparse teacher's is its own (None, or the
        same value; another is an error, as in fastkd.sparse_kd_loss).
    softcap: Gemma-style soft-capping of both sides' logits, c tanh(z / c), before temperature.
    vocab_size: run over the first V rows of each head (padded heads); later rows get zero gradient.
    chunk_size: rows per chunk (None: see auto_chunk_rows). Other options as in fastkd.kd_loss.
    vocab_shard: a fastkd.distributed.VocabShard when the heads (student_weight, teacher_weight,
        biases) hold this rank's slice of the vocabulary's rows; hidden states are the same on every
        rank, labels and sparse-teacher ids global, grad_hidden summed over the ranks. A DTensor
        student_weight sharded on V (ColwiseParallel) needs none: the shard is its placement's.
    return_metrics: also return a fastkd.KDMetrics -- the KD / CE split, top-1 agreement with the
        teacher and the student's entropy over the kept rows, from each chunk's logits in the same
        pass (fastkd/_metrics.py); not with vocab_shard.
    Under autocast the logits are computed in the autocast dtype. Returns the loss (fp32), or
    (loss, KDMetrics); gradients reach student_hidden, student_weight and student_bias.
    """
    sparse = teacher is not None
    options = dict(temperature=1.0 if temperature is None and not sparse else temperature, divergence=divergence,
                   beta=beta, tail=tail, reduction=reduction, ignore_index=ignore_index, hard_weight=hard_weight,
                   scale_by_t2=scale_by_t2, vocab_size=vocab_size, backend=backend, sparse=sparse)
    heads = Heads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                  teacher, softcap, chunk_size)
    return fused_linear_loss(heads, labels, options, vocab_shard, return_metrics)


def fused_linear_loss(heads: Heads, labels, options, vocab_shard=None, return_metrics=False):
    """fused_linear_kd_loss with its options (a LossOptions, or loss_options' arguments: as_options)."""
    if not isinstance(return_metrics, bool):
        raise TypeError(f"return_metrics must be a bool, got {return_metrics!r}")
    if _validate.is_dtensor(heads.student_weight):  # tensor parallelism: the shard from the placement
        from . import distributed

        local, shard, mesh = distributed.dtensor_heads(heads, vocab_shard)
        return distributed.replicated(fused_linear_loss(local, labels, options, shard, return_metrics), mesh)
    if vocab_shard is not None:
        from . import distributed

        return distributed.fused_linear_kd_loss(vocab_shard, heads, labels, options, return_metrics)
    o = as_options(options)
    c = check_heads(heads, labels, o)
    if not c.dense:
        o = with_teacher(o, heads.teacher)
    chunk = c.chunk or auto_chunk_rows(c.h.shape[0], c.vocab, torch.empty((), dtype=c.dtype).element_size(), c.h.device)
    loop = Chunked(c, row_op(c.dense, o, c.h.device), c.vocab, chunk)
    if return_metrics:
        loop.metrics = ChunkMetrics(o, c.labels is not None, c.h.device)
    loss = run(c, o, loop)
    return (loss, loop.metrics.result()) if return_metrics else loss


class FusedLinearKDLoss(torch.nn.Module):
    """Module form of `fused_linear_kd_loss`, with the same options and defaults.

    forward(student_hidden, student_weight, student_bias=None, *, teacher_hidden=None,
            teacher_weight=None, teacher_bias=None, teacher=None, labels=None,
            return_metrics=False) -> loss, or (loss, fastkd.KDMetrics)
    """

    def __init__(self, *, softcap=None, chunk_size=None, temperature=None, divergence="forward_kl", beta=0.5,
                 tail="bucket", reduction="mean", ignore_index=-100, hard_weight=0.0, scale_by_t2=True,
                 vocab_size=None, backend="auto"):
        super().__init__()
        # checked at construction (a dense teacher's and a sparse one's options alike), kept
        self.dense_options = loss_options(temperature=1.0 if temperature is None else temperature,
                                          divergence=divergence, beta=beta, reduction=reduction,
                                          ignore_index=ignore_index, hard_weight=hard_weight, scale_by_t2=scale_by_t2,
                                          vocab_size=vocab_size, backend=backend, tail=tail)
        self.sparse_options = None
        if divergence == "forward_kl":
            self.sparse_options = loss_options(
                temperature=temperature, divergence=divergence, beta=beta, tail=tail, reduction=reduction,
                ignore_index=ignore_index, hard_weight=hard_weight, scale_by_t2=scale_by_t2, vocab_size=vocab_size,
                backend=backend, sparse=True)
        self.softcap, self.chunk_size = softcap, chunk_size

    def _options(self, teacher):
        if teacher is None:
            return self.dense_options
        if self.sparse_options is None:  # the error a sparse call with this divergence gives
            loss_options(divergence=self.dense_options.divergence, sparse=True)
        return self.sparse_options

    def forward(self, student_hidden, student_weight, student_bias=None, *, teacher_hidden=None,
                teacher_weight=None, teacher_bias=None, teacher=None, labels=None, return_metrics=False):
        heads = Heads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                      teacher, self.softcap, self.chunk_size)
        return fused_linear_loss(heads, labels, self._options(teacher), return_metrics=return_metrics)

    def extra_repr(self) -> str:
        return f"softcap={self.softcap!r}, chunk_size={self.chunk_size!r}, " + self.dense_options.describe()
