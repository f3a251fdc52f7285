"""`fastkd.fused_linear_kd_loss` / `fastkd.FusedLinearKDLoss`: KD straight from the last hidden
states and the LM head, never holding the [N, V] student logits (DESIGN 1).

The rows are taken a chunk at a time: the chunk's student logits h_c W^T (+ b, soft-capped) go
into one [chunk, V] buffer reused for every chunk, the teacher's logits for the chunk (its own
hidden states and head, under no_grad, or rows of a SparseTeacher) beside them, and the fused row
op of the chosen backend (dense_kd or sparse_kd) turns them into the loss and the logits'
gradient G. Then grad_hidden[c] = G W and grad_weight += G^T h_c, grad_bias += sum G, accumulated
in fp32 for 16-bit weights. So the three GEMMs of a linear layer run once each, in the forward
pass; backward only scales (the kept-gradient autograd, fastkd/_autograd.py). (With reduction
"none" the upstream gradient differs per row, which grad_w and grad_b, sums over the rows, cannot
take after the fact: the forward keeps only the loss and backward runs the chunk loop again.)

chunk_size=None picks the chunk so that the per-chunk [chunk, V] buffers -- student logits,
teacher logits and the op's gradient, fp32 when upcast -- take about 1/8 of the device's free
memory (CUDA: torch.cuda.mem_get_info), or 256 MiB on the CPU, between 1 and N rows; see
`auto_chunk_rows`.
"""
from typing import NamedTuple

import torch

from . import _validate, backends
from ._ops import grad_dtype
from ._options import loss_options, with_teacher
from ._autograd import KeptRows
from ._metrics import ChunkMetrics
from ._reduce import reduce_rows, row_weight

CPU_CHUNK_BYTES = 256 << 20
UNBOUNDED = 1 << 62  # a vocabulary bound for checks made before a sharded call's total is known


def auto_chunk_rows(n: int, vocab: int, element_size: int, device: torch.device) -> int:
    """Rows per chunk: three [chunk, V] buffers within 1/8 of the free device memory (CUDA) or
    256 MiB (CPU), at least 1 and at most n."""
    budget = CPU_CHUNK_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 8
    per_row = 3 * vocab * max(element_size, 4)
    return max(1, min(n, budget // max(per_row, 1)))


def _logits(h, weight, bias, softcap):
    """h [n, H] @ weight [V, H]^T (+ bias), soft-capped: softcap * tanh(z / softcap)."""
    z = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


class _Chunked:
    """The chunk loop, shared by forward (reduction mean/sum) and backward (reduction none)."""

    def __init__(self, c, row_op, vocab, chunk, shard=None):
        """c: the call's Checked tensors; row_op(z, teacher rows, labels, grad_scale, compute_grad) ->
        (loss [n], grad [n, V]); vocab: the head rows in use; chunk: rows per chunk."""
        self.h, self.weight, self.bias, self.labels = c.h, c.weight, c.bias, c.labels
        self.dense, self.teacher_rows, self.row_op = c.dense, c.teacher_rows, row_op
        self.softcap, self.chunk, self.vocab, self.dtype = c.softcap, chunk, vocab, c.dtype
        self.shard = shard  # a VocabShard: the head holds one slice of the vocabulary, grad_h is summed
        self.metrics = None  # a ChunkMetrics (fastkd/_metrics.py), filled by the first run

    def teacher(self, a, b, logits_dtype):
        """The teacher's rows a:b for the row op: dense, its logits (under no_grad); sparse, its entries."""
        if not self.dense:
            return tuple(x[a:b] for x in self.teacher_rows)
        th, tw, tb = self.teacher_rows
        with torch.no_grad():
            if not isinstance(tw, torch.Tensor):  # the teacher's own head module, on this chunk's rows
                z = tw(th[a:b])[:, :self.vocab].to(logits_dtype)
                return z if self.softcap is None else torch.tanh(z / self.softcap) * self.softcap
            return _logits(th[a:b].to(logits_dtype), tw[:self.vocab].to(logits_dtype),
                           None if tb is None else tb[:self.vocab].to(logits_dtype), self.softcap)

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
        for a in range(0, n, self.chunk):
            hc = h[a:a + self.chunk].to(dtype)
            z = _logits(hc, w_used, b_used, self.softcap)
            lab = None if self.labels is None else self.labels[a:a + self.chunk]
            t = self.teacher(a, a + hc.shape[0], z.dtype)
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
                grad_w[:self.vocab] += (g.t() @ hc.to(gdt)).to(grad_w.dtype)
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
    def options():
        sparse = teacher is not None
        return loss_options(temperature=1.0 if temperature is None and not sparse else temperature,
                            divergence=divergence, beta=beta, tail=tail, reduction=reduction,
                            ignore_index=ignore_index, hard_weight=hard_weight, scale_by_t2=scale_by_t2,
                            vocab_size=vocab_size, backend=backend, sparse=sparse)

    heads = Heads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                  teacher, softcap, chunk_size)
    return fused_linear_loss(heads, labels, options, vocab_shard, return_metrics)


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


def fused_linear_loss(heads: Heads, labels, options, vocab_shard=None, return_metrics=False):
    """fused_linear_kd_loss with its options (options() builds the checked LossOptions)."""
    if not isinstance(return_metrics, bool):
        raise TypeError(f"return_metrics must be a bool, got {return_metrics!r}")
    if _validate.is_dtensor(heads.student_weight):  # tensor parallelism: the shard from the placement
        from . import distributed

        local, shard, mesh = distributed.dtensor_heads(heads, vocab_shard)
        return distributed.replicated(fused_linear_loss(local, labels, options, shard, return_metrics), mesh)
    if vocab_shard is not None:
        return _sharded(vocab_shard, heads, labels, options, return_metrics)
    o = options()
    c = check_heads(heads, labels, o)
    if not c.dense:
        o = with_teacher(o, heads.teacher)
    chunk = c.chunk or auto_chunk_rows(c.h.shape[0], c.vocab, torch.empty((), dtype=c.dtype).element_size(), c.h.device)
    loop = _Chunked(c, _row_op(c.dense, o, c.h.device), c.vocab, chunk)
    if return_metrics:
        loop.metrics = ChunkMetrics(o, c.labels is not None, c.h.device)
    loss = run(c, o, loop)
    return (loss, loop.metrics.result()) if return_metrics else loss


def _sharded(vocab_shard, heads: Heads, labels, options, return_metrics=False):
    """The vocab-parallel call (docs/distributed.md): the rank-local checks (a bad argument on one
    rank is raised on every rank), the agreement on the layout, then the chunk loop over this
    rank's rows of the head with fastkd.distributed's row op."""
    from . import distributed

    shard = distributed.check_shard(vocab_shard)

    def check():
        o = options()
        if return_metrics:
            raise ValueError("fused_linear_kd_loss(return_metrics=True, vocab_shard=...) is not supported: each rank "
                             "holds a slice of the logits (measure on an unsharded head)")
        if o.reduction == "none":
            raise ValueError("fused_linear_kd_loss(reduction='none', vocab_shard=...) is not supported: its "
                             "backward would run the ranks' collectives again, and a rank that skipped backward "
                             "would leave every other one waiting; use reduction='mean' or 'sum'")
        c = check_heads(heads, labels, o, sharded=True)
        return (o if c.dense else with_teacher(o, heads.teacher)), c

    o, c = distributed.refused(shard, check)
    h, w = heads.student_hidden, heads.student_weight
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h, w, heads.student_bias))
    agreed = o.key() + ("fused", c.dense, h.shape[-1], h.requires_grad, str(h.dtype), str(w.dtype), c.labels is None,
                        repr(heads.softcap), repr(heads.chunk_size))
    content = (c.labels, None if c.dense else c.teacher_rows[0]) if shard.check else ()
    layout = shard.agree(c.h.shape[0], w.shape[0], agreed, grad, content)
    used, total = distributed.used_columns(layout, o.vocab_size)
    layout = distributed.Layout(layout.start, used, total, layout.world)
    # the same chunk on every rank, from the agreed total, not from each rank's free memory
    chunk = c.chunk or auto_chunk_rows(c.h.shape[0], -(-total // layout.world),
                                       torch.empty((), dtype=c.dtype).element_size(), torch.device("cpu"))
    # (replay=False: a second backward of a retained graph would run the collectives again)
    return run(c, o, _Chunked(c, distributed.fused_row_op(shard, layout, c.dense, o), used, chunk, shard),
               replay=False)


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
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
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


def _row_op(dense, o, device):
    """The fused row op of an unsharded call: dense_kd or sparse_kd of the backend."""
    op = backends.kernel("dense_kd" if dense else "sparse_kd", o.backend, device)
    if dense:
        return lambda z, t, lab, grad_scale, compute_grad: op(
            z, t, lab, o.divergence, o.temperature, o.beta, o.ignore_index, o.hard_weight, o.scale_by_t2,
            grad_scale, compute_grad)
    return lambda z, t, lab, grad_scale, compute_grad: op(
        z, *t, lab, o.tail, o.temperature, o.ignore_index, o.hard_weight, o.scale_by_t2, grad_scale, compute_grad)


def run(c: Checked, o, loop, replay=True):
    """The loss of the chunk loop, through the kept-gradient autograd (KeptRows): with the
    reduction's row weight folded into the row op's gradient, as kd_loss does, so grad_h, grad_w
    and grad_b come out of the chunk loop already weighted."""
    need = (c.h.requires_grad, c.weight.requires_grad, c.bias is not None and c.bias.requires_grad)
    grad_scale = row_weight(c.labels, o.ignore_index, o.reduction, c.h.shape[0], c.h.device)

    def rows_and_grads(compute_grad, row_scale):
        rows, *grads = loop.run(compute_grad, grad_scale, row_scale, need)
        return rows, tuple(grads)

    with torch.autocast(c.h.device.type, enabled=False):
        # grad_h is per row; grad_w and grad_b are sums over the rows (uniform for "mean" / "sum")
        rows = KeptRows.apply(rows_and_grads, grad_scale, o.reduction != "none", replay, (True, False, False),
                              c.h, c.weight, c.bias)
    return reduce_rows(rows, c.labels, o.ignore_index, o.reduction, c.lead)


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
        return fused_linear_loss(heads, labels, lambda: self._options(teacher), return_metrics=return_metrics)

    def extra_repr(self) -> str:
        return f"softcap={self.softcap!r}, chunk_size={self.chunk_size!r}, " + self.dense_options.describe()
