"""Checks of the tensors the public losses are given (the options are _options.py's): each error
names the argument and its value."""
import torch

from ._options import KINDS, SparseTeacher, check_vocab_size

# a vocabulary bound for the checks made before a vocab-parallel call's total is agreed
UNBOUNDED = 1 << 62


def check_logits(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (fp32, bf16, fp16 or fp64), got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a vocabulary dimension [..., V], got a 0-d tensor")


def check_vocab(name: str, x: torch.Tensor) -> None:
    """Logits [..., V] with V >= 1: a distribution needs at least one entry."""
    if x.shape[-1] == 0:
        raise ValueError(f"{name} {tuple(x.shape)} has V=0 entries in its last (vocabulary) dimension: "
                         "there is no distribution to distil")


def check_not_transformed(x: torch.Tensor) -> None:
    """The fused losses cannot run under torch.func transforms (grad, vmap, jacrev, ...): their
    gradient is computed in the forward pass, with no graph of its own. Say so, instead of the
    internal error torch.func would raise."""
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(x):
        raise NotImplementedError(
            "fastkd's fused losses do not support torch.func transforms (torch.func.grad, vmap, "
            "jacrev, ...): their gradient is computed in the forward pass and has no graph of its "
            "own. Use loss.backward() or torch.autograd.grad.")


def check_same_vocab(student_name: str, student_v: int, teacher_name: str, teacher_v: int) -> None:
    if student_v != teacher_v:
        raise ValueError(
            f"vocabulary sizes differ: {student_name} has V={student_v}, {teacher_name} has V={teacher_v}; "
            f"for LM heads padded past one tokenizer's vocabulary pass vocab_size=<its size> (the loss "
            f"then runs over the first vocab_size columns of each)"
        )


def check_pair(student, teacher, student_name="student_logits", teacher_name="teacher_logits"):
    """Both logits tensors: one dtype, one device, one shape, the vocabulary last."""
    check_logits(student_name, student)
    check_not_transformed(student)
    check_logits(teacher_name, teacher)
    check_same_vocab(student_name, student.shape[-1], teacher_name, teacher.shape[-1])
    if student.shape != teacher.shape:
        raise ValueError(
            f"{student_name} {tuple(student.shape)} and {teacher_name} {tuple(teacher.shape)} "
            "must have the same leading shape"
        )
    if student.device != teacher.device:
        raise ValueError(f"{student_name} is on {student.device} but {teacher_name} is on {teacher.device}")
    if student.dtype != teacher.dtype:
        raise TypeError(
            f"{student_name} is {student.dtype} but {teacher_name} is {teacher.dtype}; pass both in "
            f"one dtype, e.g. {teacher_name}.to({student.dtype})"
        )


def vocab_in_use(vocab_size, *sizes: int) -> int | None:
    """The columns the loss runs over (docs/design.md 1, padded LM heads): None (all, sizes must agree)
    or vocab_size, at most every given size."""
    if check_vocab_size(vocab_size) is None:
        return None
    if any(vocab_size > v for v in sizes):
        raise ValueError(f"vocab_size={vocab_size} exceeds a vocabulary dimension of {min(sizes)}")
    return vocab_size


def vocab_columns(vocab_size, student, teacher=None):
    """(student, teacher) cut to their first `vocab_size` columns (views; the teacher may be None)."""
    if vocab_size is None or not isinstance(student, torch.Tensor):
        return student, teacher
    sizes = [student.shape[-1]] + ([teacher.shape[-1]] if isinstance(teacher, torch.Tensor) else [])
    v = vocab_in_use(vocab_size, *sizes)
    cut = lambda x: x if not isinstance(x, torch.Tensor) or x.shape[-1] == v else x[..., :v]  # noqa: E731
    return cut(student), cut(teacher)


def check_labels(labels, logits: torch.Tensor, options) -> torch.Tensor | None:
    """Labels flattened to [N] int64 (or None): shape, dtype and device. Their range is the op's to
    check: it reads them (the CPU ops raise a ValueError naming the row; a CUDA kernel makes a bad
    label's row NaN, with no device sync), and a vocab-parallel call checks them over the ranks."""
    if labels is None:
        if options.hard_weight > 0:
            raise ValueError(f"hard_weight={options.hard_weight} needs labels (the hard-label term is CE against them)")
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    lead = tuple(logits.shape[:-1])
    if tuple(labels.shape) != lead:
        raise ValueError(f"labels must have the logits' leading shape {lead}, got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but the logits are on {logits.device}")
    return labels.reshape(-1).long()


def check_sparse_teacher(teacher, student, vocab=None):
    """The teacher's (indices [N, k] int64, logprobs [N, k] fp32, tail_logmass [N] fp32): its type,
    shapes against the student's leading shape, k against a vocabulary of `vocab` ids (None: the
    student's), devices."""
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
    # the values (ids in range and unique, log-probs <= 0) are the op's to check: it reads them
    return idx.reshape(-1, k).long(), lp.reshape(-1, k).float(), tail.reshape(-1).float()


def is_dtensor(x) -> bool:
    """Whether x is a torch.distributed.tensor.DTensor (checked without importing it)."""
    return isinstance(x, torch.Tensor) and hasattr(x, "device_mesh") and hasattr(x, "placements")
