"""The three vocab-parallel losses side by side -- kd_loss, sparse_kd_loss and fused_linear_kd_loss
with vocab_shard= -- each: the rank-local checks inside the guard (shard.refused), the agreement,
then the row math of rows.py (dense_rows / sparse_rows) through the kept-gradient autograd."""
import math

import torch

from .. import _validate, backends
from .._autograd import KeptRows
from .._fused_loop import Chunked, Heads, auto_chunk_rows, check_heads, run
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


def _run_rows(rows_fn, shard, layout, flat, *args, reduction, flat_labels, ignore_index, lead, backend):
    """rows_fn over the slice's columns in use, through the kept-gradient autograd, then reduced."""
    weight = row_weight(flat_labels, ignore_index, reduction, flat.shape[0], flat.device)

    def rows_and_grad(compute_grad, _row_scale):
        rows, grad = rows_fn(shard, layout, flat.detach(), *args, weight, compute_grad, backend)
        return rows, (grad,)

    # the slice's gradient is per row; its collectives cannot run again in backward (replay=False)
    rows = KeptRows.apply(rows_and_grad, weight, reduction != "none", False, (True,), flat)
    return reduce_rows(rows, flat_labels, ignore_index, reduction, lead)


def _row_checks(student, labels, o, op):
    """The checks kd_loss and sparse_kd_loss share on a slice -> labels [N] (ranges: later, globally)."""
    flat_labels = _validate.check_labels(labels, student, o)
    backends.resolve(op, o.backend, student.device)
    return flat_labels


def _sharded_rows(shard, rows_fn, student_logits, o, teacher_args, row_args, flat_labels, agreed=(), ids=None):
    """Agree, cut the slice to the columns in use, run rows_fn through the kept-gradient autograd
    and reduce. teacher_args(n, vocab, used): the teacher's arguments for the cut slice; ids: a
    sparse teacher's, which every rank must pass alike (as the labels)."""
    content = (flat_labels, ids) if shard.check else ()
    vocab = student_logits.shape[-1]
    n = math.prod(student_logits.shape[:-1])
    flat = student_logits.reshape(n, vocab)
    layout = shard.agree(n, vocab, o.key() + (flat_labels is None, str(student_logits.dtype)) + agreed,
                         torch.is_grad_enabled() and flat.requires_grad, content)
    used, total = used_columns(layout, o.vocab_size)
    layout = Layout(layout.start, used, total, layout.world)
    return _run_rows(rows_fn, shard, layout, flat[:, :used], *teacher_args(n, vocab, used), flat_labels, *row_args,
                     reduction=o.reduction, flat_labels=flat_labels, ignore_index=o.ignore_index,
                     lead=student_logits.shape[:-1], backend=o.backend)


def kd_loss(vocab_shard, student_logits, teacher_logits, labels, options):
    """fastkd.kd_loss(..., vocab_shard=...): this rank's slices [..., V_r] of both logits; options as
    as_options takes them."""
    shard = check_shard(vocab_shard)

    def check():
        o = as_options(options)
        _validate.check_pair(student_logits, teacher_logits)
        return o, _row_checks(student_logits, labels, o, "dense_kd_shard")

    o, flat_labels = refused(shard, check)
    return _sharded_rows(shard, dense_rows, student_logits, o,
                         lambda n, vocab, used: (teacher_logits.reshape(n, vocab)[:, :used].detach(),),
                         (o.divergence, o.temperature, o.beta, o.ignore_index, o.hard_weight, o.scale_by_t2),
                         flat_labels)


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
    return _sharded_rows(shard, sparse_rows, student_logits, o, lambda n, vocab, used: rows,
                         (o.tail, o.temperature, o.ignore_index, o.hard_weight, o.scale_by_t2), flat_labels,
                         agreed=("sparse", rows[0].shape[-1]), ids=rows[0])


def fused_row_op(shard, layout, dense, o):
    """The row op of a vocab-parallel fused linear call: z [n, V_r] (this rank's rows of the head's
    logits), the teacher's rows, labels -> dense_rows / sparse_rows over the ranks."""
    if dense:
        return lambda z, t, lab, grad_scale, grad: dense_rows(
            shard, layout, z, t, lab, o.divergence, o.temperature, o.beta, o.ignore_index, o.hard_weight,
            o.scale_by_t2, grad_scale, grad, o.backend)
    return lambda z, t, lab, grad_scale, grad: sparse_rows(
        shard, layout, z, *t, lab, o.tail, o.temperature, o.ignore_index, o.hard_weight, o.scale_by_t2, grad_scale,
        grad, o.backend)


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
