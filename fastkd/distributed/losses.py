"""The three vocab-parallel losses side by side -- kd_loss, sparse_kd_loss and fused_linear_kd_loss
with vocab_shard= -- each: the rank-local checks inside the guard (shard.refused), the agreement,
then the row math of rows.py (dense_rows / sparse_rows) through the kept-gradient autograd."""
import math
from typing import NamedTuple

import torch

from .. import _validate, backends
from .._autograd import KeptRows
from .._fused_loop import Chunked, Heads, auto_chunk_rows, check_heads, option_args, run, teacher_args
from .._options import as_options, with_teacher
from .._reduce import reduce_rows, row_weight
from .._validate import UNBOUNDED
from .rows import dense_rows, sparse_rows
from .shard import Layout, check_shard, refused


def used_columns(layout: Layout, vocab_size):
    """(columns of this slice the loss runs over, the vocabulary in use): vocab_size (a padded head:
    docs/design.md 1) cuts the slices where it falls; it must not exceed the total."""
    if vocab_size is None:
        return layout.size, layout.total
    if vocab_size > layout.total:
        raise ValueError(f"vocab_size={vocab_size} exceeds the sharded vocabulary's total={layout.total}")
    return max(0, min(layout.size, vocab_size - layout.start)), vocab_size


class ShardRowOp(NamedTuple):
    """The row op of a vocab-parallel call on one rank's slice: (z [n, V_r], the teacher's rows -- its
    logits' slice, or a SparseTeacher's (indices, logprobs, tail) --, labels, grad_scale, compute_grad)
    -> (loss [n], grad [n, V_r]) by dense_rows / sparse_rows over the ranks, with the call's options."""

    shard: object
    layout: Layout
    dense: bool
    o: object  # the call's LossOptions

    def __call__(self, z, t, lab, grad_scale, grad):
        rows = dense_rows if self.dense else sparse_rows
        return rows(self.shard, self.layout, z, *teacher_args(t, self.dense), lab, *option_args(self.o, self.dense),
                    grad_scale, grad, self.o.backend)


class SliceRows(NamedTuple):
    """What KeptRows runs for kd_loss / sparse_kd_loss on a slice: (rows, (grad,)) of the row op."""

    row_op: ShardRowOp
    flat: torch.Tensor
    teacher: tuple | torch.Tensor
    labels: torch.Tensor | None
    weight: object

    def __call__(self, compute_grad, _row_scale):
        rows, grad = self.row_op(self.flat.detach(), self.teacher, self.labels, self.weight, compute_grad)
        return rows, (grad,)


def _row_checks(student, labels, o, op):
    """The checks kd_loss and sparse_kd_loss share on a slice -> labels [N] (ranges: later, globally)."""
    flat_labels = _validate.check_labels(labels, student, o)
    backends.resolve(op, o.backend, student.device)
    return flat_labels


def _sharded_rows(shard, student_logits, o, teacher, flat_labels, dense):
    """Agree, cut the slice to the columns in use, run the row op through the kept-gradient autograd
    and reduce. teacher: the dense teacher's logits (cut like the student's), or a sparse teacher's
    checked rows, whose ids every rank must pass alike (as the labels)."""
    ids = None if dense else teacher[0]
    content = (flat_labels, ids) if shard.check else ()
    vocab = student_logits.shape[-1]
    n = math.prod(student_logits.shape[:-1])
    flat = student_logits.reshape(n, vocab)
    agreed = () if dense else ("sparse", ids.shape[-1])
    layout = shard.agree(n, vocab, o.key() + (flat_labels is None, str(student_logits.dtype)) + agreed,
                         torch.is_grad_enabled() and flat.requires_grad, content)
    used, total = used_columns(layout, o.vocab_size)
    layout = Layout(layout.start, used, total, layout.world)
    t = teacher.reshape(n, vocab)[:, :used].detach() if dense else teacher
    weight = row_weight(flat_labels, o.ignore_index, o.reduction, n, flat.device)
    run = SliceRows(ShardRowOp(shard, layout, dense, o), flat[:, :used], t, flat_labels, weight)
    # the slice's gradient is per row; its collectives cannot run again in backward (replay=False)
    rows = KeptRows.apply(run, weight, o.reduction != "none", False, (True,), flat[:, :used])
    return reduce_rows(rows, flat_labels, o.ignore_index, o.reduction, student_logits.shape[:-1])


def kd_loss(vocab_shard, student_logits, teacher_logits, labels, options):
    """fastkd.kd_loss(..., vocab_shard=...): this rank's slices [..., V_r] of both logits; options as
    as_options takes them."""
    shard = check_shard(vocab_shard)

    def check():
        o = as_options(options)
        _validate.check_pair(student_logits, teacher_logits)
        return o, _row_checks(student_logits, labels, o, "dense_kd_shard")

    o, flat_labels = refused(shard, check)
    return _sharded_rows(shard, student_logits, o, teacher_logits, flat_labels, dense=True)


def sparse_kd_loss(vocab_shard, student_logits, teacher, labels, options):
    """fastkd.sparse_kd_loss(..., vocab_shard=...): this rank's slice [..., V_r] of the student's
    logits, a SparseTeacher [..., k] with global ids (the same on every rank)."""
    shard = check_shard(vocab_shard)

    def check():
        o = as_options(options)
        _validate.check_logits("student_logits", student_logits)
        _validate.check_not_transformed(student_logits)
        rows = _validate.check_sparse_teacher(teacher, student_logits, vocab=UNBOUNDED)  # ids: against the total
        o = with_teacher(o, teacher)
        return rows, o, _row_checks(student_logits, labels, o, "sparse_kd_shard")

    rows, o, flat_labels = refused(shard, check)
    return _sharded_rows(shard, student_logits, o, rows, flat_labels, dense=False)


def fused_row_op(shard, layout, dense, o) -> ShardRowOp:
    """The row op of a vocab-parallel fused linear call: z [n, V_r] (this rank's rows of the head's
    logits), the teacher's rows, labels -> dense_rows / sparse_rows over the ranks."""
    return ShardRowOp(shard, layout, dense, o)


def fused_linear_kd_loss(vocab_shard, heads: Heads, labels, options, return_metrics=False):
    """The vocab-parallel call (docs/distributed.md): the rank-local checks (a bad argument on one
    rank is raised on every rank), the agreement on the layout, then the chunk loop over this
    rank's rows of the head with the row op of dense_rows / sparse_rows (fused_row_op)."""
    shard = check_shard(vocab_shard)

    def check():
        o = as_options(options)
        if return_metrics:
            raise ValueError("fused_linear_kd_loss(return_metrics=True, vocab_shard=...) is not supported: each rank "
                             "holds a slice of the logits (measure on an unsharded head)")
        if o.reduction == "none":
            raise ValueError("fused_linear_kd_loss(reduction='none', vocab_shard=...) is not supported: its "
                             "backward would run the ranks' collectives again, and a rank that skipped backward "
                             "would leave every other one waiting; use reduction='mean' or 'sum'")
        c = check_heads(heads, labels, o, sharded=True)
        return (o if c.dense else with_teacher(o, heads.teacher)), c

    o, c = refused(shard, check)
    h, w = heads.student_hidden, heads.student_weight
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h, w, heads.student_bias))
    agreed = o.key() + ("fused", c.dense, h.shape[-1], h.requires_grad, str(h.dtype), str(w.dtype), c.labels is None,
                        repr(heads.softcap), repr(heads.chunk_size))
    content = (c.labels, None if c.dense else c.teacher_rows[0]) if shard.check else ()
    layout = shard.agree(c.h.shape[0], w.shape[0], agreed, grad, content)
    used, total = used_columns(layout, o.vocab_size)
    layout = Layout(layout.start, used, total, layout.world)
    # the same chunk on every rank, from the agreed total, not from each rank's free memory
    chunk = c.chunk or auto_chunk_rows(c.h.shape[0], -(-total // layout.world),
                                       torch.empty((), dtype=c.dtype).element_size(), torch.device("cpu"))
    # (replay=False: a second backward of a retained graph would run the collectives again)
    return run(c, o, Chunked(c, fused_row_op(shard, layout, c.dense, o), used, chunk, shard),
               replay=False)
