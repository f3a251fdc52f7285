"""The row math of the vocab-parallel losses (fastkd.distributed): each rank's kernels on its slice
[N, V_r] of the vocabulary, the few numbers per row that cross the network, and the whole rows'
loss and this slice's gradient from them -- the steps 1-3 of docs/distributed.md. The columns of
the [N, k] float64 tensors between the kernels and the collectives are named (the ops' layouts,
DENSE_STATS / DENSE_ROW / SPARSE_STATS / SPARSE_ROW in fastkd/_ops.py) and read by name here.

`shard` is the call's fastkd.distributed.VocabShard (its all_reduce), `layout` its Layout.
"""
import math
from collections import namedtuple

import torch

from .. import _math, backends
from .._math import NEG_INF, log_normaliser
from .._ops import DENSE_ROW, DENSE_STATS, SPARSE_ROW, SPARSE_STATS, acc_dtype, grad_dtype


def _named(x: torch.Tensor, columns):
    """The columns of x [N, len(columns)] by name: _named(stats, DENSE_STATS).m_a is x[:, 0]."""
    return namedtuple("Columns", columns)(*x.unbind(-1))


def _labels_of(labels, layout, ignore_index, n, device):
    """(kept [N], bad [N] (a kept label outside [0, total)), labels for the slice's ops: its own
    ids less start, -1 for ignored rows (the ops' ignore_index), -2 for ids of other slices)."""
    if labels is None:
        return torch.ones(n, dtype=torch.bool, device=device), torch.zeros(n, dtype=torch.bool, device=device), None
    kept = labels != ignore_index
    bad = kept & ((labels < 0) | (labels >= layout.total))
    local = labels - layout.start
    here = kept & (local >= 0) & (local < layout.size)
    return kept, bad, torch.where(here, local, torch.where(kept, -2, -1))


def _gathered(student, ids):
    """student.gather(-1, ids), zeros for an empty slice (whose ids are all placeholders)."""
    if student.shape[1] == 0:
        return student.new_zeros(ids.shape)
    return student.gather(-1, ids)


def _label_logit(student, local):
    """[N] float64: the student's raw logit at the label where the label lies in this slice, else 0."""
    if local is None:
        return torch.zeros(student.shape[0], dtype=torch.float64, device=student.device)
    here = local >= 0
    return torch.where(here, _gathered(student, torch.where(here, local, 0).unsqueeze(-1)).squeeze(-1).double(), 0.0)


def _refuse_rows(shard, layout, flags, labels, indices):
    """With check=True, raise on every rank when some rank found a kept label (flags column 0) or a
    teacher id (column 1) outside [0, total): the flags are summed over the ranks, so every rank
    sees them alike. (This reads a value back: a device sync on CUDA; check=False makes such a
    row NaN instead.)"""
    if not shard.check:
        return
    hit = flags > 0
    if not bool(hit.any()):
        return
    r, what = (int(x) for x in hit.nonzero()[0])
    if what == 0:
        raise ValueError(f"labels must lie in [0, {layout.total}) (the whole vocabulary) or equal ignore_index; "
                         f"row {r} has {int(labels[r]) if labels is not None else '?'} (refused on every rank)")
    raise ValueError(f"teacher.indices must lie in [0, {layout.total}) (the whole vocabulary); row {r} has "
                     f"{indices[r].tolist() if indices is not None else '?'} (refused on every rank)")


def _combine(shard, maxima, sums, owners, flags):
    """Step 1's collectives. maxima [N, m]: this slice's row maxima (NaN: it read a NaN or +inf);
    sums [N, s]: sums at the maxima of columns `owners` (NaN likewise); flags [N, f] to add up ->
    (M [N, m], S [N, s], flags [N, f + 1]): the rows' maxima, their sums at M, the flags summed and
    last the count of ranks that read a NaN or +inf."""
    bad = (maxima.isnan().any(-1, keepdim=True) | sums.isnan().any(-1, keepdim=True))
    maxima = torch.where(maxima.isnan(), NEG_INF, maxima)
    big = shard.all_reduce(maxima.clone(), "max")
    scale = torch.where(maxima > NEG_INF, (maxima - torch.where(big > NEG_INF, big, 0.0)).exp(), 0.0)[:, owners]
    total = torch.cat([torch.where(bad, 0.0, sums * scale), flags.double(), bad.double()], -1)
    shard.all_reduce(total, "sum")
    return big, total[:, :sums.shape[1]], total[:, sums.shape[1]:]


def dense_rows(shard, layout, student, teacher, labels, divergence, temperature, beta, ignore_index,
               hard_weight, scale_by_t2, grad_scale, compute_grad, backend):
    """The slice [N, V_r] of student and teacher logits, labels [N] (global ids) -> (loss [N] in
    the accumulation dtype, the same on every rank; grad [N, V_r] for this slice, or None)."""
    n, device = student.shape[0], student.device
    hard = hard_weight > 0
    stats = backends.kernel("dense_kd_stats", backend, device)(student, teacher, temperature, hard)
    kept, bad_label, local = _labels_of(labels, layout, ignore_index, n, device)
    st = _named(stats, DENSE_STATS)
    # maxima of a, b, s; the sums s_a and r_a at m_a, s_b at m_b, s_1 at m_1; flags: far, a bad label
    big, sums, flags = _combine(shard, torch.stack([st.m_a, st.m_b, st.m_1], -1),
                                torch.stack([st.s_a, st.r_a, st.s_b, st.s_1], -1), [0, 0, 1, 2],
                                torch.stack([st.far, bad_label.double()], -1))
    m_a, m_b, m_1 = big.unbind(-1)
    s_a, r_a, s_b, s_1 = sums.unbind(-1)
    far, bad_labels, nan_ranks = flags.unbind(-1)
    _refuse_rows(shard, layout, bad_labels.unsqueeze(-1), labels, None)
    poisoned = kept & ((bad_labels > 0) | (nan_ranks > 0))
    live = m_a > NEG_INF
    kd_on = live & (m_b > NEG_INF)
    log_s_a, log_s_b, log_s_1 = s_a.log(), s_b.log(), s_1.log()  # (r_a may be negative: only r_a / s_a is used)
    # lse(b) - lse(a): log1p(R / S_a) for a close row (kd_math.h's rule), else the difference
    dl = torch.where(far > 0, (m_b + log_s_b) - (m_a + log_s_a), torch.log1p(r_a / s_a))
    named = dict(m_a=m_a, log_s_a=log_s_a, m_b=m_b, log_s_b=log_s_b, dl=dl, m_1=m_1, log_s_1=log_s_1,
                 u=torch.full_like(dl, -1.0 if divergence == "forward_kl" else 0.0))
    row = torch.stack([named[c] for c in DENSE_ROW], -1)
    # a row with a student distribution but no teacher's: the teacher's columns neutral; a row with none
    no_teacher = torch.stack([torch.full_like(dl, NEG_INF) if c == "m_b" else torch.zeros_like(dl)
                              if c in ("log_s_b", "dl") else named[c] for c in DENSE_ROW], -1)
    empty = torch.tensor([NEG_INF if c.startswith("m_") else 0.0 for c in DENSE_ROW], dtype=torch.float64,
                         device=device)
    row = torch.where(kd_on.unsqueeze(-1), row, torch.where(live.unsqueeze(-1), no_teacher, empty))
    row = torch.where(poisoned.unsqueeze(-1), math.nan, row)
    op = backends.kernel("dense_kd_shard", backend, device)
    # forward KL's U = -1 is known: the gradient comes with the shares. The others' needs the row's U:
    # the shares' pass gives it with U = 0 (w u + the hard part) and dense_kd_finish subtracts w U q
    # -- except for bf16, whose gradient, rounded between the two, could lose what u - q U keeps
    # when they nearly cancel: it runs dense_kd_shard again once U is known.
    finish = compute_grad and divergence != "forward_kl" and grad_dtype(student.dtype) != torch.bfloat16
    one_pass = compute_grad and (divergence == "forward_kl" or finish)
    parts, grad = op(student, teacher, local, row, divergence, temperature, beta, -1, float(hard_weight),
                     scale_by_t2, grad_scale, one_pass)
    shares = torch.cat([parts, _label_logit(student, local).unsqueeze(-1)], -1)
    shard.all_reduce(shares, "sum")
    big_d, big_u, x_label = shares.unbind(-1)  # the row's D and U, the student's logit at the label
    w = _math.row_weights(temperature, hard_weight, scale_by_t2, grad_scale)
    loss = torch.where(kd_on, w.kd_loss * big_d.clamp_min(0), 0.0)
    if hard:
        loss = loss + torch.where(live, w.hard * (m_1 + log_s_1 - x_label), 0.0)
    loss = _finish(loss, kept, poisoned, student)
    if compute_grad and divergence != "forward_kl":
        u = DENSE_ROW.index("u")
        row[:, u] = torch.where(kd_on, big_u, row[:, u])
        if finish:
            backends.kernel("dense_kd_finish", backend, device)(grad, student, row, temperature, w.kd_grad)
        else:
            _, grad = op(student, teacher, local, row, divergence, temperature, beta, -1, float(hard_weight),
                         scale_by_t2, grad_scale, True)
    return loss, grad if compute_grad else None


def _finish(loss, kept, poisoned, student):
    """The loss [N] in the accumulation dtype: 0 at ignored rows, NaN at kept rows that read a NaN."""
    loss = torch.where(kept, torch.where(poisoned, math.nan, loss), 0.0)
    return loss.to(acc_dtype(student.dtype))


def sparse_rows(shard, layout, student, indices, logprobs, tail_logmass, labels, tail, temperature, ignore_index,
                hard_weight, scale_by_t2, grad_scale, compute_grad, backend):
    """The student's slice [N, V_r], a sparse teacher's [N, k] rows (global ids), labels [N] ->
    (loss [N], the same on every rank; grad [N, V_r] for this slice, or None)."""
    n, device = student.shape[0], student.device
    hard = hard_weight > 0
    local_ids = indices - layout.start
    stats = backends.kernel("sparse_kd_stats", backend, device)(student, local_ids, logprobs, temperature, hard)
    kept, bad_label, local = _labels_of(labels, layout, ignore_index, n, device)
    known = logprobs > NEG_INF
    bad_ids = (~(logprobs == NEG_INF) & ((indices < 0) | (indices >= layout.total))).any(-1)
    st = _named(stats, SPARSE_STATS)
    big, sums, flags = _combine(shard, torch.stack([st.m_in, st.m_out, st.m_1], -1),
                                torch.stack([st.s_in, st.s_out, st.s_1], -1), [0, 1, 2],
                                torch.stack([bad_label.double(), bad_ids.double()], -1))
    _refuse_rows(shard, layout, flags[:, :2], labels, indices)  # (bad labels, bad ids)
    teacher_nan = logprobs.isnan().any(-1) | tail_logmass.isnan()
    poisoned = kept & ((flags.sum(-1) > 0) | teacher_nan)
    lse_in, lse_tail, lse_1 = (big + torch.where(big > NEG_INF, sums.log(), NEG_INF)).unbind(-1)
    lse_all = torch.logaddexp(lse_in, lse_tail)
    live = lse_all > NEG_INF
    col = lambda x: x.unsqueeze(-1)  # noqa: E731
    c = _math.tail_coefficients(tail, col(lse_all), col(lse_in), col(lse_tail),
                                       log_normaliser(torch.where(known, logprobs.double(), NEG_INF)),
                                       col(tail_logmass.double()))
    here = known & (local_ids >= 0) & (local_ids < layout.size)
    a_i = _gathered(student, torch.where(here, local_ids, 0)).to(acc_dtype(student.dtype)) * (1.0 / temperature)
    share = torch.where(here, _math.sparse_term(logprobs.double(), a_i.double(), c), 0.0).sum(-1)
    shares = torch.stack([share, _label_logit(student, local)], -1)
    shard.all_reduce(shares, "sum")
    kd_share, x_label = shares.unbind(-1)  # the terms over I, the student's logit at the label
    w = _math.row_weights(temperature, hard_weight, scale_by_t2, grad_scale)
    loss = torch.where(live, w.kd_loss * (kd_share + c.extra.squeeze(-1)).clamp_min(0), 0.0)
    if hard:
        loss = loss + torch.where(live, w.hard * (lse_1 - x_label), 0.0)
    loss = _finish(loss, kept, poisoned, student)
    if not compute_grad:
        return loss, None
    named = dict(shift=c.shift, in_scale=c.in_scale, in_norm=c.in_norm, out_scale=c.out_scale, lse_all=col(lse_all),
                 tail_scale=c.tail_scale, lse_tail=col(lse_tail), lse_1=col(lse_1))
    row = torch.cat([named[name].expand(n, 1) for name in SPARSE_ROW], -1)
    dead = torch.tensor([NEG_INF if name.startswith("lse_") else 0.0 for name in SPARSE_ROW], dtype=torch.float64,
                        device=device)
    row = torch.where(col(live), row, dead)
    row = torch.where(col(poisoned), math.nan, row).contiguous()
    grad = backends.kernel("sparse_kd_shard", backend, device)(
        student, local_ids, logprobs, local, row, temperature, -1, float(hard_weight), scale_by_t2, grad_scale)
    return loss, grad
