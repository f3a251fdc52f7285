"""DTensor tensor parallelism: the VocabShard comes from the placement (docs/distributed.md). A
DTensor student sharded on V over a 1-D mesh makes the vocab-parallel call on its local tensor; the
teacher (or the other heads) is cut to the same columns inside the guard, so a teacher that is
wrong on one rank is an error on every rank; the loss comes back replicated."""
import torch

from .. import _validate
from .shard import VocabShard, refused


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
