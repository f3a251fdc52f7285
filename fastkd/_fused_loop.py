"""The chunk loop of the fused linear KD loss (fastkd.fused_linear_kd_loss, and its vocab-parallel
form in fastkd/distributed/losses.py): the rank-local checks of the heads (check_heads -> Checked),
the loop over row chunks (Chunked) and its loss through the kept-gradient autograd (run).

The rows are taken a chunk at a time: the chunk's student logits h_c W^T (+ b, soft-capped) go
into one [chunk, V] buffer reused for every chunk, the teacher's logits for the chunk (its own
hidden states and head, under no_grad, or rows of a SparseTeacher) beside them, and the fused row
op of the chosen backend (dense_kd or sparse_kd) turns them into the loss and the logits'
gradient G. Then grad_hidden[c] = G W and grad_weight += G^T h_c, grad_bias += sum G, the weight's
and bias's sums accumulated from fp32 products for 16-bit weights.
"""
from typing import NamedTuple

import torch

from . import _validate, backends
from ._autograd import KeptRows
from ._ops import grad_dtype
from ._reduce import reduce_rows, row_weight
from ._validate import UNBOUNDED


CPU_CHUNK_BYTES = 256 << 20


def auto_chunk_rows(n: int, vocab: int, element_size: int, device: torch.device) -> int:
    """Rows per chunk: three [chunk, V] buffers within 1/8 of the free device memory (CUDA) or
    256 MiB (CPU), at least 1 and at most n."""
    budget = CPU_CHUNK_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 8
    per_row = 3 * vocab * max(element_size, 4)
    return max(1, min(n, budget // max(per_row, 1)))


def head_logits(h, weight, bias, softcap, out=None):
    """h [n, H] @ weight [V, H]^T (+ bias), soft-capped: softcap * tanh(z / softcap); written into
    `out` ([>= n, V], the loop's one buffer) when given (outside autograd: the loop runs under it)."""
    if out is None:
        z = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
        return z if softcap is None else torch.tanh(z / softcap) * softcap
    z = out[:h.shape[0]]
    if bias is not None:
        torch.addmm(bias, h, weight.t(), out=z)
    else:
        torch.mm(h, weight.t(), out=z)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def add_product(acc, a, b):
    """acc += a @ b with the product formed in acc's dtype (fp32, or fp64): a 16-bit product G^T h_c
    is not rounded to 16 bits before it is summed over the chunks. CUDA multiplies 16-bit operands
    into fp32 itself (mm's out_dtype); elsewhere the operands are widened first."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:
            acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
            return
        except (RuntimeError, TypeError):  # (a torch without mm's out_dtype for these dtypes)
            pass
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class Chunked:
    """The chunk loop, shared by forward (reduction mean/sum) and backward (reduction none), and by the
    unsharded and the vocab-parallel call (shard: the call's VocabShard)."""

    def __init__(self, c, row_op, vocab, chunk, shard=None):
        """c: the call's Checked tensors; row_op(z, teacher rows, labels, grad_scale, compute_grad) ->
        (loss [n], grad [n, V]); vocab: the head rows in use; chunk: rows per chunk."""
        self.h, self.weight, self.bias, self.labels = c.h, c.weight, c.bias, c.labels
        self.dense, self.teacher_rows, self.row_op = c.dense, c.teacher_rows, row_op
        self.softcap, self.chunk, self.vocab, self.dtype = c.softcap, chunk, vocab, c.dtype
        self.shard = shard  # a VocabShard: the head holds one slice of the vocabulary, grad_h is summed
        self.metrics = None  # a ChunkMetrics (fastkd/_metrics.py), filled by the first run
        self.grad_scale, self.need = 1.0, (True, True, True)  # the call's row weight and gradients (run())

    def rows_and_grads(self, compute_grad: bool, row_scale=None):
        """What KeptRows runs: (loss rows, (grad_h, grad_w, grad_b)) with the call's grad_scale and need."""
        rows, *grads = self.run(compute_grad, self.grad_scale, row_scale, self.need)
        return rows, tuple(grads)

    def teacher_head(self, logits_dtype):
        """A dense teacher's head (weight, bias) cut to the vocabulary in use and cast to the logits'
        dtype, once per run; None for a sparse teacher or a head module."""
        if not self.dense or not isinstance(self.teacher_rows[1], torch.Tensor):
            return None
        _, tw, tb = self.teacher_rows
        return tw[:self.vocab].to(logits_dtype), None if tb is None else tb[:self.vocab].to(logits_dtype)

    def teacher(self, a, b, logits_dtype, head=None, out=None):
        """The teacher's rows a:b for the row op: dense, its logits (under no_grad; from `head`, the
        run's teacher_head, into `out`, the loop's teacher buffer); sparse, its entries."""
        if not self.dense:
            return tuple(x[a:b] for x in self.teacher_rows)
        th, tw, _ = self.teacher_rows
        with torch.no_grad():
            if head is None:  # the teacher's own head module, on this chunk's rows
                z = tw(th[a:b])[:, :self.vocab].to(logits_dtype)
                return z if self.softcap is None else torch.tanh(z / self.softcap) * self.softcap
            return head_logits(th[a:b].to(logits_dtype), *head, self.softcap, out)

    def run(self, compute_grad: bool, grad_scale=1.0, row_scale=None, need=(True, True, True)):
        """-> (loss rows [N] fp32, grad_h, grad_w (fp32, [V_full, H]), grad_b (fp32)); grads are
        None where not needed. grad_scale: the row weight the row op folds into its gradient;
        row_scale: [N] per-row factors applied to each chunk's gradient on top."""
        h, weight, bias, dtype = self.h, self.weight, self.bias, self.dtype
        n = h.shape[0]
        w_used = weight[:self.vocab].to(dtype)
        b_used = bias[:self.vocab].to(dtype) if bias is not None else None
        gdt = grad_dtype(dtype)  # fp16's gradient GEMMs run in fp32: its range cannot hold them (docs/math.md)
        w_grad = w_used.to(gdt) if compute_grad and need[0] else None
        rows = torch.empty(n, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=h.device)
        # (a shard's grad_h is one term of a sum over ranks: kept in fp32 until summed)
        h_dt = torch.promote_types(grad_dtype(h.dtype), torch.float32) if self.shard else grad_dtype(h.dtype)
        grad_h = torch.empty(h.shape, dtype=h_dt, device=h.device) if compute_grad and need[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32 if dtype != torch.float64 else dtype,
                             device=h.device) if compute_grad and need[1] else None
        grad_b = torch.zeros(bias.shape, dtype=grad_w.dtype if grad_w is not None else torch.float32,
                             device=h.device) if compute_grad and bias is not None and need[2] else None
        # one [chunk, V] buffer of student logits (and one of a dense teacher's), reused by every chunk
        rows_c = min(self.chunk, n)
        z_buf = torch.empty(rows_c, self.vocab, dtype=dtype, device=h.device)
        t_head = self.teacher_head(dtype)
        t_buf = torch.empty_like(z_buf) if t_head is not None else None
        for a in range(0, n, self.chunk):
            hc = h[a:a + self.chunk].to(dtype)
            z = head_logits(hc, w_used, b_used, self.softcap, z_buf)
            lab = None if self.labels is None else self.labels[a:a + self.chunk]
            t = self.teacher(a, a + hc.shape[0], z.dtype, t_head, t_buf)
            try:
                loss, g = self.row_op(z, t, lab, grad_scale, compute_grad)
            except ValueError as e:  # the op checks what it reads (labels, teacher ids): name the call's row
                if a == 0 and n <= self.chunk:
                    raise
                raise ValueError(f"{e} (rows counted from row {a} of the call's {n}: a chunk of "
                                 f"{self.chunk})") from None
            rows[a:a + hc.shape[0]] = loss
            if self.metrics is not None and not self.metrics.done:  # from the chunk's logits while they are here
                with torch.no_grad():
                    self.metrics.add(z, _teacher_top1(t, self.dense), lab, loss)
            if not compute_grad:
                continue
            g = g.to(gdt)
            if row_scale is not None:
                g = g * row_scale[a:a + hc.shape[0]].unsqueeze(-1).to(gdt)
            if self.softcap is not None:  # d(c tanh(x / c))/dx = 1 - tanh^2 = 1 - (z / c)^2
                g = g * (1 - (z.to(gdt) / self.softcap) ** 2)
            if grad_h is not None:
                grad_h[a:a + hc.shape[0]] = (g @ w_grad).to(grad_h.dtype)
            if grad_w is not None:
                add_product(grad_w[:self.vocab], g.t(), hc.to(gdt))
            if grad_b is not None:
                grad_b[:self.vocab] += g.sum(0, dtype=grad_b.dtype)
        if self.metrics is not None:  # (once: a replayed backward does not add again)
            self.metrics.done = True
        if self.shard is not None and grad_h is not None:
            self.shard.all_reduce(grad_h, "sum")  # [N, H]: the one collective of O(N H)
            grad_h = grad_h.to(grad_dtype(h.dtype))
        return rows, grad_h, grad_w, grad_b


def _teacher_top1(t, dense):
    """The teacher's most probable id per row of a chunk: its logits' argmax, or the id of a
    SparseTeacher's largest log-prob entry."""
    if dense:
        return t.argmax(-1)
    indices, logprobs, _ = t
    return indices.gather(-1, logprobs.argmax(-1, keepdim=True)).squeeze(-1)


class Heads(NamedTuple):
    """The tensors of a fused linear call, as given (fused_linear_kd_loss's arguments)."""

    student_hidden: torch.Tensor
    student_weight: torch.Tensor
    student_bias: torch.Tensor | None
    teacher_hidden: torch.Tensor | None
    teacher_weight: torch.Tensor | None
    teacher_bias: torch.Tensor | None
    teacher: object  # a SparseTeacher, or None for a dense teacher
    softcap: float | None
    chunk_size: int | None


class Checked(NamedTuple):
    """A call's tensors after the rank-local checks: h [N, H], the leading shape, the vocabulary
    in use (None: a sharded call's, known after the agreement), labels [N] or None, the teacher's
    rows (dense: its hidden states [N, H_t], head and bias cut to the vocabulary; sparse: indices,
    logprobs, tail), the compute dtype and the chunk (None: from the vocabulary)."""

    h: torch.Tensor
    lead: tuple
    weight: torch.Tensor
    bias: torch.Tensor | None
    dense: bool
    teacher_rows: tuple
    labels: torch.Tensor | None
    softcap: float | None
    chunk: int | None
    vocab: int | None
    dtype: torch.dtype


def check_chunk_size(chunk_size):
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def check_heads(heads: Heads, labels, o, sharded=False) -> Checked:
    """Every check that needs no other rank -> Checked. A sharded call's vocabulary is checked once
    the ranks agree on its total (fastkd.distributed.fused_linear_kd_loss)."""
    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, teacher, softcap,
     chunk_size) = heads
    for name, x in (("student_hidden", student_hidden), ("student_weight", student_weight)):
        _validate.check_logits(name, x)
        _validate.check_not_transformed(x)
    if student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"student_weight must be [V, H] with H = student_hidden's {student_hidden.shape[-1]}, "
                         f"got {tuple(student_weight.shape)}")
    if student_bias is not None and tuple(student_bias.shape) != (student_weight.shape[0],):
        raise ValueError(f"student_bias must be [{student_weight.shape[0]}], got {tuple(student_bias.shape)}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    check_chunk_size(chunk_size)
    dense = teacher is None
    if dense == (teacher_weight is None) or dense != (teacher_hidden is not None):
        raise ValueError("give the teacher either as teacher_hidden + teacher_weight (+ teacher_bias), "
                         "or as teacher=SparseTeacher, not both and not neither")
    if student_weight.shape[0] == 0 and not sharded:  # (a vocab-parallel rank may hold no rows)
        raise ValueError(f"student_weight {tuple(student_weight.shape)} has no rows: an LM head needs V >= 1")
    head_module = dense and not isinstance(teacher_weight, torch.Tensor) and callable(teacher_weight)
    if head_module:  # the teacher's own head (a quantised Linear, ...): its rows' V from one row
        if teacher_bias is not None:
            raise ValueError("teacher_bias goes with a teacher_weight tensor; a head module applies its own")
        with torch.no_grad():
            t_vocab = teacher_weight(teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[:1]).shape[-1]
    elif dense:
        _validate.check_logits("teacher_weight", teacher_weight)
        if teacher_weight.dim() != 2:
            raise ValueError(f"teacher_weight must be [V, H_t] (the teacher's LM head), got "
                             f"{tuple(teacher_weight.shape)}")
        if teacher_bias is not None and tuple(teacher_bias.shape) != (teacher_weight.shape[0],):
            raise ValueError(f"teacher_bias must be [{teacher_weight.shape[0]}] (teacher_weight's V), "
                             f"got {tuple(teacher_bias.shape)}")
    lead, hid = student_hidden.shape[:-1], student_hidden.shape[-1]
    h = student_hidden.reshape(-1, hid)
    vocab = None
    if not sharded:
        t_rows = (t_vocab if head_module else teacher_weight.shape[0]) if dense else None
        sizes = [student_weight.shape[0]] + ([t_rows] if dense else [])
        vocab = _validate.vocab_in_use(o.vocab_size, *sizes)
        if vocab is None:
            if dense:
                _validate.check_same_vocab("student_weight", student_weight.shape[0], "teacher_weight", t_rows)
            vocab = student_weight.shape[0]
    probe = student_hidden[..., :1].expand(*lead, vocab if vocab is not None else 1)  # the logits' shape
    flat_labels = _validate.check_labels(labels, probe, o)
    if head_module:
        if teacher_hidden.shape[:-1] != lead:
            raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} must have the student's leading shape "
                             f"{tuple(lead)}")
        rows = (teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]), teacher_weight, None)
    elif dense:
        if teacher_hidden.shape[:-1] != lead or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
            raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} and teacher_weight "
                             f"{tuple(teacher_weight.shape)} must be [..., H_t] (the student's leading "
                             f"shape {tuple(lead)}) and [V, H_t]")
        rows = (teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]), teacher_weight.detach(),
                None if teacher_bias is None else teacher_bias.detach())
    else:
        rows = _validate.check_sparse_teacher(teacher, probe, vocab=UNBOUNDED if sharded else vocab)
    # autocast casts fp32 (never fp64) operands of a matmul to its dtype
    device = h.device
    autocast = torch.is_autocast_enabled(device.type) and torch.float64 not in (h.dtype, student_weight.dtype)
    dtype = torch.get_autocast_dtype(device.type) if autocast else h.dtype
    return Checked(h, lead, student_weight, student_bias, dense, rows, flat_labels, softcap, chunk_size, vocab, dtype)


class RowOp(NamedTuple):
    """The fused row op of an unsharded call -- the backend's dense_kd or sparse_kd -- with the call's
    options: (z [n, V], teacher rows, labels, grad_scale, compute_grad) -> (loss [n], grad [n, V])."""

    dense: bool
    op: object
    o: object  # the call's LossOptions

    def __call__(self, z, t, lab, grad_scale, compute_grad):
        return self.op(z, *teacher_args(t, self.dense), lab, *option_args(self.o, self.dense), grad_scale, compute_grad)


def teacher_args(t, dense) -> tuple:
    """The teacher's arguments of a row op: a dense teacher's logits, or a sparse one's (indices, logprobs, tail)."""
    return (t,) if dense else tuple(t)


def option_args(o, dense) -> tuple:
    """The options a row op takes after its labels, in the schemas' order (fastkd/_ops.py): dense_kd's
    and dense_kd_shard's, or sparse_kd's and sparse_kd_shard's."""
    if dense:
        return o.divergence, o.temperature, o.beta, o.ignore_index, o.hard_weight, o.scale_by_t2
    return o.tail, o.temperature, o.ignore_index, o.hard_weight, o.scale_by_t2


def row_op(dense, o, device) -> RowOp:
    """The fused row op of an unsharded call on `device`."""
    return RowOp(dense, backends.kernel("dense_kd" if dense else "sparse_kd", o.backend, device), o)


def run(c: Checked, o, loop, replay=True):
    """The loss of the chunk loop, through the kept-gradient autograd (KeptRows): with the
    reduction's row weight folded into the row op's gradient, as kd_loss does, so grad_h, grad_w
    and grad_b come out of the chunk loop already weighted."""
    loop.need = (c.h.requires_grad, c.weight.requires_grad, c.bias is not None and c.bias.requires_grad)
    loop.grad_scale = row_weight(c.labels, o.ignore_index, o.reduction, c.h.shape[0], c.h.device)
    with torch.autocast(c.h.device.type, enabled=False):
        # grad_h is per row; grad_w and grad_b are sums over the rows (uniform for "mean" / "sum")
        rows = KeptRows.apply(loop.rows_and_grads, loop.grad_scale, o.reduction != "none", replay,
                              (True, False, False), c.h, c.weight, c.bias)
    return reduce_rows(rows, c.labels, o.ignore_index, o.reduction, c.lead)
