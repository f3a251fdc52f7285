"""Vocab-parallel losses over torch.distributed: each rank holds the logits (or the LM-head rows) of
a contiguous slice [start, start + V_r) of a vocabulary of `total` ids -- Megatron-style tensor
parallelism -- and gets the exact loss of the whole rows and its own slice of the gradient, while
only a few numbers per row cross the network (docs/distributed.md). This module is the protocol:
VocabShard and its agreement, and the losses' entry points; the row math of steps 1-3 is
fastkd/_sharded_rows.py.

    shard = fastkd.distributed.VocabShard()          # slices in rank order, from their sizes
    loss = fastkd.kd_loss(student_slice, teacher_slice, vocab_shard=shard, temperature=2.0)

Per call, on N rows (the collectives are torch.distributed's, NCCL or gloo; the kernels are the
backend's partial forms -- ops dense_kd_stats / dense_kd_shard, sparse_kd_stats / sparse_kd_shard):

    0. agree    all_gather of HEADER (8 int64 per rank): row counts, slice sizes and positions,
                a hash of the options and a checksum of the labels and sparse-teacher ids (which
                every rank must pass alike); a bad argument on any rank is raised on every rank
    1. stats    the slice's row maxima and sums of exponentials -> all_reduce MAX of [N, 3],
                then all_reduce SUM of [N, 7 (dense) | 6 (sparse)] rescaled sums and flags
    2. shares   the slice's shares of the row sums (dense: D, U; sparse: sum over its ids) and the
                label's logit where the label lies in the slice -> all_reduce SUM of [N, 3 | 2]
    3. grad     the slice's gradient from the whole row's statistics (no communication)

All float64: 13 numbers (104 bytes) per row for the dense loss, 11 (88 bytes) for the sparse one.
The agreement runs on the CPU when the process group has a CPU backend (gloo; torch's default
group has one beside NCCL), so reading it costs no device sync. With check=False it runs whole
only on the first call; later calls all-reduce just (N, -N), so a rank passing another N is an
error on every rank, not a collective of mismatched sizes.
"""
import hashlib
import math
from dataclasses import dataclass
from numbers import Integral

import torch

from . import _validate, backends
from ._autograd import KeptRows
from ._options import with_teacher
from ._reduce import reduce_rows, row_weight
from ._sharded_rows import dense_rows, sparse_rows

UNBOUNDED = 1 << 62  # a vocabulary bound for checks made before the total is known
HEADER = ("ok", "rows", "size", "start", "total", "options", "grad", "content")


def _dist():
    import torch.distributed as dist  # (imported on use: fastkd works where torch.distributed does not)

    return dist


def _int_or_none(name, x):
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, Integral) or x < 0:
        raise ValueError(f"{name} must be a non-negative int or None, got {x!r}")
    return int(x)


@dataclass(frozen=True)
class Layout:
    """Where this rank's slice lies: [start, start + size) of `total` ids, `world` ranks."""
    start: int
    size: int
    total: int
    world: int


class VocabShard:
    """This rank's slice of a vocabulary split over the ranks of `group` (None: the default group).

    start, total: the slice [start, start + V_r) of `total` ids, V_r being the size of the
    vocabulary dimension this rank passes; both None (the default): the slices follow one another
    in rank order, sizes taken from the tensors (uneven shards are fine). Either way every call
    checks on every rank that the slices tile [0, total) (check=True; see the module docs).
    """

    def __init__(self, group=None, start=None, total=None, *, check=True):
        start, total = _int_or_none("start", start), _int_or_none("total", total)
        if (start is None) != (total is None):
            raise ValueError("give VocabShard both start and total, or neither (then the slices follow "
                             "one another in rank order)")
        if total is not None and start > total:
            raise ValueError(f"start={start} lies past total={total}")
        if not isinstance(check, bool):
            raise TypeError(f"check must be a bool, got {check!r}")
        dist = _dist()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("fastkd.distributed.VocabShard needs torch.distributed initialised "
                               "(torch.distributed.init_process_group) before it is made")
        self.group, self.start, self.total, self.check = group, start, total, check
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._layout = None  # from the first agreement
        self._host_ok = _has_cpu_backend(dist, group)  # the agreement on the CPU: no device sync

    def header_device(self) -> torch.device:
        """Where the agreement's small tensors live: the CPU when the group can reduce there."""
        return torch.device("cpu") if self._host_ok else self.device()

    def __repr__(self):
        where = "in rank order" if self.start is None else f"start={self.start}, total={self.total}"
        return f"VocabShard(rank {self.rank} of {self.world}, {where})"

    def device(self) -> torch.device:
        """Where the collectives' tensors live: the current CUDA device for NCCL, else the CPU."""
        if _dist().get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_gather_header(self, own):
        dist = _dist()
        own = own.to(self.header_device())
        out = [torch.empty_like(own) for _ in range(self.world)]
        dist.all_gather(out, own, group=self.group)
        return torch.stack(out).tolist()

    def _raise_everywhere(self, error):
        """Every rank calls this when some rank's header says its call was bad."""
        messages = [None] * self.world
        _dist().all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}",
                                  group=self.group)
        said = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m)
        raise ValueError(f"fastkd vocab-parallel call refused on every rank ({said})") from error

    def fail(self, error):
        """Join the agreement with a bad call of this rank's: raises `error`'s message on every rank."""
        self._all_gather_header(torch.zeros(len(HEADER), dtype=torch.long))
        self._raise_everywhere(error)

    def agree(self, rows: int, size: int, options: tuple, grad: bool, content=()) -> Layout:
        """The agreement (step 0): the same call on every rank, or a ValueError on every rank.
        content: tensors every rank must pass alike (labels [N], sparse-teacher ids [N, k])."""
        if self._layout is not None and not self.check:
            if size != self._layout.size:
                raise ValueError(f"this rank's vocabulary slice changed from {self._layout.size} to {size} "
                                 "columns (VocabShard(check=False) keeps the layout of its first call)")
            self._same_rows(rows)
            return self._layout
        digest = _digest(repr(options).encode())
        own = [1, rows, size, -1 if self.start is None else self.start, -1 if self.total is None else self.total,
               digest, int(grad), _checksum(content)]
        headers = self._all_gather_header(torch.tensor(own, dtype=torch.long))
        if not all(h[0] for h in headers):
            self._raise_everywhere(None)
        layout = self._layout_of(headers)
        self._layout = layout
        return layout

    def _same_rows(self, rows: int):
        """check=False's one collective before the row statistics: (N, -N) all-reduced by MAX, the
        same size on every rank, so a rank with another N is a ValueError on every rank."""
        both = torch.tensor([rows, -rows], dtype=torch.long, device=self.header_device())
        _dist().all_reduce(both, op=_dist().ReduceOp.MAX, group=self.group)
        most, least = int(both[0]), -int(both[1])
        if most != least:
            raise ValueError(f"fastkd vocab-parallel call refused on every rank: the ranks pass different numbers "
                             f"of rows N (from {least} to {most}; this rank {rows}); VocabShard(check=False) checks "
                             "only N after its first call")

    def _layout_of(self, headers) -> Layout:
        """Check the headers (the same on every rank, so every rank decides alike)."""
        col = {name: [h[i] for h in headers] for i, name in enumerate(HEADER)}
        problems = []
        if len(set(col["rows"])) > 1:
            problems.append(f"the ranks pass different numbers of rows N: {col['rows']}")
        if len(set(col["options"])) > 1 or len(set(col["grad"])) > 1:
            problems.append("the ranks call with different options (loss, divergence, temperature, tail, "
                            "reduction, labels, dtype or requires_grad differ)")
        elif len(set(col["rows"])) == 1 and len(set(col["content"])) > 1:
            groups = {}
            for r, c in enumerate(col["content"]):
                groups.setdefault(c, []).append(r)
            problems.append("the ranks pass different labels or sparse-teacher ids (every rank must pass the same "
                            f"rows; ranks alike: {sorted(groups.values())})")
        sizes, starts, totals = col["size"], col["start"], col["total"]
        given = [s >= 0 for s in starts]
        if any(given) and not all(given):
            problems.append("some ranks give VocabShard start/total and others do not")
        elif all(given):
            if len(set(totals)) > 1:
                problems.append(f"the ranks give different totals: {totals}")
            spans = sorted((s, s + v, r) for r, (s, v) in enumerate(zip(starts, sizes)))
            edge = 0
            for s, e, r in spans:
                if s != edge:
                    problems.append(f"rank {r}'s slice [{s}, {e}) ({sizes[r]} columns from start={s}) does not "
                                    f"begin where the previous slice ends ({edge}): the slices must tile "
                                    f"[0, total) without gaps or overlaps")
                    break
                edge = e
            else:
                if edge != totals[0]:
                    problems.append(f"the slices cover [0, {edge}) but total={totals[0]}; a slice's size "
                                    f"disagrees with start/total (sizes {sizes}, starts {starts})")
        if problems:
            raise ValueError("fastkd vocab-parallel call refused on every rank: " + "; ".join(problems))
        if all(given):
            return Layout(starts[self.rank], sizes[self.rank], totals[0], self.world)
        return Layout(sum(sizes[:self.rank]), sizes[self.rank], sum(sizes), self.world)

    def all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        """In place on x (moved to the collectives' device and back when they differ)."""
        dist = _dist()
        here = x if x.device == self.device() else x.to(self.device())
        dist.all_reduce(here, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group)
        if here is not x:
            x.copy_(here)
        return x


def _has_cpu_backend(dist, group) -> bool:
    """Whether `group` reduces CPU tensors (gloo, or torch's default "cpu:gloo,cuda:nccl")."""
    try:
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        pg._get_backend(torch.device("cpu"))
        return True
    except Exception:  # noqa: BLE001 -- no CPU backend (NCCL alone), or an older torch without the lookup
        return dist.get_backend(group) == "gloo"


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=7).digest(), "little")


def _checksum(tensors) -> int:
    """A 56-bit checksum of integer tensors (labels, ids): their sums plain and position-weighted,
    computed where they live and read back (the check=True agreement reads its header anyway)."""
    parts = []
    for x in tensors:
        if x is None:
            parts.append(-1)
            continue
        flat = x.reshape(-1).long()
        weights = (torch.arange(1, flat.numel() + 1, device=flat.device) * 2654435761) % 4294967311
        parts += [flat.numel()] + torch.stack([flat.sum(), (flat * weights).sum()]).tolist()
    return _digest(repr(parts).encode())


def refused(shard, check):
    """Run the local checks `check()`; an error on this rank -- whatever its type -- is raised on every
    rank, naming this rank and the cause, instead of leaving the others waiting in the agreement."""
    try:
        return check()
    except Exception as error:  # noqa: BLE001 -- any error here (an IndexError too) must reach every rank
        shard.fail(error)


def check_shard(vocab_shard):
    if not isinstance(vocab_shard, VocabShard):
        raise TypeError(f"vocab_shard must be a fastkd.distributed.VocabShard, got {type(vocab_shard).__name__}")
    return vocab_shard


def used_columns(layout: Layout, vocab_size):
    """(columns of this slice the loss runs over, the vocabulary in use): vocab_size (a padded head:
    DESIGN 1) cuts the slices where it falls; it must not exceed the total."""
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
    """fastkd.kd_loss(..., vocab_shard=...): this rank's slices [..., V_r] of both logits; options()
    builds the checked LossOptions."""
    shard = check_shard(vocab_shard)

    def check():
        o = options()
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
        o = options()
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


# DTensor tensor parallelism: the VocabShard comes from the placement (docs/distributed.md)

def _split(name, x, dim):
    """(the DTensor x's local tensor, its 1-D mesh, whether dimension `dim` is sharded over it)."""
    mesh, placements = x.device_mesh, tuple(x.placements)
    if mesh.ndim != 1:
        raise ValueError(f"{name} is a DTensor on a {mesh.ndim}-D mesh {tuple(mesh.mesh_dim_names or ())}: fastkd "
                         "takes the tensor-parallel dimension alone (a 1-D mesh, e.g. mesh['tp'])")
    p = placements[0]
    if p.is_replicate():
        return x.to_local(), mesh, False
    if p.is_shard() and p.dim % x.ndim == dim % x.ndim:
        return x.to_local(), mesh, True
    raise ValueError(f"{name} is a DTensor placed {placements}: fastkd takes it replicated or sharded on its "
                     f"vocabulary dimension ({dim % x.ndim}), e.g. ColwiseParallel(output_layouts=Shard(-1)) "
                     "for the logits, or the LM head's weight under ColwiseParallel (Shard(0))")


def _chunk_of(total: int, mesh):
    """[start, stop) of this rank's chunk of `total` ids under a Shard placement (torch.chunk's split)."""
    world, rank = mesh.size(), mesh.get_local_rank()
    step = -(-total // world)
    return min(rank * step, total), min((rank + 1) * step, total)


def _columns(name, x, total, mesh, dim):
    """This rank's slice along `dim` of x: a DTensor sharded alike, or a full tensor cut to the chunk."""
    if x is None:
        return None
    if _validate.is_dtensor(x):
        local, _, sharded = _split(name, x, dim)
        if sharded:
            return local
        x = local
    start, stop = _chunk_of(total, mesh)
    if x.shape[dim] != total:
        raise ValueError(f"{name} has {x.shape[dim]} entries along its vocabulary dimension, the sharded "
                         f"student's {total}")
    return x.narrow(dim % x.ndim, start, stop - start)


def replicated(loss, mesh):
    """The loss, the same on every rank, as a replicated DTensor on `mesh`."""
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)


def _no_shard_given(vocab_shard):
    if vocab_shard is not None:
        raise ValueError("vocab_shard comes from the DTensor's placement; pass plain (local) tensors with a "
                         "VocabShard, or DTensors without one")


def dtensor_rows(kind, student, teacher, vocab_shard=None):
    """kd_loss ("dense") / sparse_kd_loss ("sparse") of a DTensor student_logits [..., V] -> (its local
    tensor, the teacher's for it, the VocabShard of its placement or None, the mesh). Sharded on V
    over a 1-D mesh, the call is the vocab-parallel one (the teacher's logits a DTensor sharded
    alike or a full tensor, cut to this rank's columns; a SparseTeacher's global ids as they are);
    replicated, the plain one on the local tensor. The gradient reaches student_logits sharded like
    it; the caller returns the loss replicated (`replicated`)."""
    _no_shard_given(vocab_shard)
    local, mesh, sharded = _split("student_logits", student, -1)
    shard = VocabShard(group=mesh.get_group()) if sharded else None
    if kind == "dense":
        if sharded:  # (inside the guard: a teacher that is wrong on one rank is an error on every rank)
            teacher = refused(shard, lambda: _columns("teacher_logits", teacher, student.shape[-1], mesh, -1))
        elif _validate.is_dtensor(teacher):
            teacher = teacher.full_tensor()
    return local, teacher, shard, mesh


def dtensor_heads(heads, vocab_shard=None):
    """fused_linear_kd_loss with a DTensor LM head: student_weight [V, H] sharded on V (ColwiseParallel's
    Shard(0)) over a 1-D mesh -> (the heads of this rank's rows -- student_bias, teacher_weight and
    teacher_bias DTensors sharded alike or full tensors, cut to the same rows; hidden states
    replicated --, its VocabShard, the mesh) for the vocab-parallel fused loss."""
    _no_shard_given(vocab_shard)
    local_w, mesh, sharded = _split("student_weight", heads.student_weight, 0)
    if not sharded:
        raise ValueError("student_weight is a replicated DTensor: pass its local tensor (student_weight.to_local())")
    total = heads.student_weight.shape[0]
    shard = VocabShard(group=mesh.get_group())

    def rows(name, x):
        return _columns(name, x, total, mesh, 0)

    def plain(name, x):  # hidden states: the same on every rank
        if _validate.is_dtensor(x):
            local, _, split = _split(name, x, -1)
            if split:
                raise ValueError(f"{name} must be replicated over the tensor-parallel mesh, got {tuple(x.placements)}")
            return local
        return x

    def cut():  # (inside the guard: a head that is wrong on one rank is an error on every rank)
        t_w = heads.teacher_weight
        t_w = rows("teacher_weight", t_w) if isinstance(t_w, torch.Tensor) else t_w
        return heads._replace(student_hidden=plain("student_hidden", heads.student_hidden), student_weight=local_w,
                              student_bias=rows("student_bias", heads.student_bias),
                              teacher_hidden=plain("teacher_hidden", heads.teacher_hidden), teacher_weight=t_w,
                              teacher_bias=rows("teacher_bias", heads.teacher_bias))

    return refused(shard, cut), shard, mesh
