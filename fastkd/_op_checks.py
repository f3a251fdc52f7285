"""The argument checks of the Python backends' ops (torch, triton), the twins of the C++ ops'
TORCH_CHECK_VALUE / TORCH_CHECK_TYPEs (csrc/op_args.cpp and the op files): an op checks what it
reads, and it alone -- the public losses check their arguments, not the values an op reads (one
owner per check, each tensor scanned once). Checks of values (ids, labels, uniforms) read the
data, so they run on CPU tensors only; on CUDA the kernels make such a row NaN instead of reading
out of bounds (docs/math.md, "NaN is never hidden"). Errors are ValueErrors, TypeErrors for a
wrong dtype, as from the C++ ops.
"""
import math

import torch

from . import _ops
from ._math import DIVERGENCES

LOGPROB_SLACK = 1e-3  # log-probs above this are not log-probs (raw logits?)


def _fail(op: str, why: str, error=ValueError):
    raise error(f"fastkd::{op}: {why}")


def _reads_values(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _logit_rows(op, name, x, temperature):
    """x [N, V] floating point, at a positive finite temperature (the checks of every op over rows of logits)."""
    if x.dim() != 2:
        _fail(op, f"{name} must be [N, V], got {tuple(x.shape)}")
    if not x.is_floating_point():
        _fail(op, f"logits must be floating point, got {x.dtype}", TypeError)
    if not (math.isfinite(temperature) and temperature > 0):
        _fail(op, f"temperature must be positive and finite, got {temperature}")


def row_loss(op, student, labels, temperature, ignore_index, hard_weight):
    _logit_rows(op, "student", student, temperature)
    if not 0 <= hard_weight <= 1:
        _fail(op, f"hard_weight must lie in [0, 1], got {hard_weight}")
    n, vocab = student.shape
    if labels is None:
        if hard_weight > 0:
            _fail(op, "hard_weight > 0 needs labels")
        return
    if labels.dtype != torch.long or tuple(labels.shape) != (n,):
        _fail(op, f"labels must be int64 [{n}], got {labels.dtype} {tuple(labels.shape)}")
    if _reads_values(labels):
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bad.any():
            r = int(bad.nonzero()[0, 0])
            _fail(op, f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                      f"got {int(labels[r])} at row {r}")


def dense(student, teacher, divergence, beta):
    if teacher.shape != student.shape:
        _fail("dense_kd", f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must match")
    if teacher.dtype != student.dtype:
        _fail("dense_kd", f"student dtype {student.dtype} and teacher dtype {teacher.dtype} must match", TypeError)
    if divergence not in DIVERGENCES:
        _fail("dense_kd", f"unknown divergence '{divergence}'")
    if divergence == "jsd" and not 0 < beta < 1:
        _fail("dense_kd", f"beta must lie in (0, 1) for jsd, got {beta}")
    if divergence.startswith("skew_") and not 0 <= beta < 1:
        _fail("dense_kd", f"beta must lie in [0, 1) for {divergence}, got {beta}")


def sparse(student, indices, logprobs, tail_logmass):
    n, vocab = student.shape
    if indices.dim() != 2 or indices.shape[0] != n or logprobs.shape != indices.shape:
        _fail("sparse_kd",
              f"indices and logprobs must be [{n}, k], got {tuple(indices.shape)} and {tuple(logprobs.shape)}")
    if indices.shape[1] < 1:
        _fail("sparse_kd", "a sparse teacher needs k >= 1 entries per row")
    if tuple(tail_logmass.shape) != (n,):
        _fail("sparse_kd", f"tail_logmass must be [{n}], got {tuple(tail_logmass.shape)}")
    if indices.dtype != torch.long or logprobs.dtype != torch.float32 or tail_logmass.dtype != torch.float32:
        _fail("sparse_kd", "indices must be int64, logprobs and tail_logmass float32", TypeError)
    if _reads_values(indices):
        why = sparse_values(indices, logprobs, tail_logmass, vocab)
        if why:
            _fail("sparse_kd", why)


def sparse_values(indices, logprobs, tail_logmass, vocab, prefix=""):
    """Why the teacher's values cannot be used (None if they can): ids of real entries (finite or
    NaN logprob) in [0, vocab) and unique per row, log-probs and tail log-mass <= 0 (to rounding).
    Rows [N, k]; `prefix` names the fields ("teacher." for the public functions)."""
    known = ~(logprobs == float("-inf"))
    bad = known & ((indices < 0) | (indices >= vocab))
    if bad.any():
        r, c = bad.nonzero()[0].tolist()
        return f"{prefix}indices must lie in [0, {vocab}); got {int(indices[r, c])} at row {r}"
    k = indices.shape[-1]
    ids = torch.where(known, indices, -1 - torch.arange(k, device=indices.device))  # padding never collides
    srt = ids.sort(-1).values
    dup = srt[:, 1:] == srt[:, :-1]
    if dup.any():
        r, c = dup.nonzero()[0].tolist()
        return f"{prefix}indices has a duplicate id {int(srt[r, c])} in row {r}"
    high = (logprobs > LOGPROB_SLACK).any(-1) | (tail_logmass > LOGPROB_SLACK)
    if high.any():
        r = int(high.nonzero()[0, 0])
        return (f"{prefix}logprobs must be log-probabilities (<= 0); row {r} has "
                f"{max(float(logprobs[r].max()), float(tail_logmass[r])):.4g} (raw logits? use "
                "fastkd.topk_teacher or fastkd.sample_teacher)")
    return None


def teacher_logits(op, logits, temperature):
    _logit_rows(op, "logits", logits, temperature)


def topk(logits, k, temperature):
    teacher_logits("topk_teacher", logits, temperature)
    if not 1 <= k <= logits.shape[1]:
        _fail("topk_teacher", f"k must lie in [1, V={logits.shape[1]}], got {k}")


def draws(logits, uniforms, temperature):
    teacher_logits("sample_teacher_draws", logits, temperature)
    n = logits.shape[0]
    if uniforms.dim() != 2 or uniforms.shape[0] != n or uniforms.dtype != torch.float64:
        _fail("sample_teacher_draws",
              f"uniforms must be float64 [{n}, S], got {uniforms.dtype} {tuple(uniforms.shape)}")
    if _reads_values(uniforms) and uniforms.numel():
        if not ((uniforms >= 0) & (uniforms < 1)).all():
            _fail("sample_teacher_draws", "uniforms must lie in [0, 1)")
        if (uniforms[:, 1:] < uniforms[:, :-1]).any():
            _fail("sample_teacher_draws", "uniforms must ascend along each row")


def unpack_bits(stream, width, start, stop):
    if stream.dim() != 1 or stream.dtype != torch.uint8:
        _fail("unpack_bits", f"stream must be a 1-D uint8 tensor, got {stream.dtype} {tuple(stream.shape)}")
    if not 1 <= width <= 24:
        _fail("unpack_bits", f"width must lie in [1, 24], got {width}")
    if not 0 <= start <= stop <= stream.numel() * 8 // width:  # no product of stop that can overflow
        _fail("unpack_bits", f"values [{start}, {stop}) lie outside a stream of {stream.numel()} bytes at {width} bits")


def unpack_monotone(bitmap, count):
    if bitmap.dim() != 2 or bitmap.dtype != torch.uint8:
        _fail("unpack_monotone", f"bitmap must be a 2-D uint8 tensor, got {bitmap.dtype} {tuple(bitmap.shape)}")
    if not 0 <= count <= bitmap.shape[1] * 8:
        _fail("unpack_monotone", f"count must lie in [0, {bitmap.shape[1] * 8}], got {count}")


def row_stats(op, stats, n, k):
    """The [N, k] float64 row statistics of a vocab-parallel op (fastkd/_ops.py's layouts)."""
    if stats.dtype != torch.float64 or tuple(stats.shape) != (n, k):
        _fail(op, f"row_stats must be float64 [{n}, {k}], got {stats.dtype} {tuple(stats.shape)}")


def shard_labels(op, labels, n):
    """Labels of a vocab-parallel op: int64 [N]; any value (ids of other slices are allowed)."""
    if labels is not None and (labels.dtype != torch.long or tuple(labels.shape) != (n,)):
        _fail(op, f"labels must be int64 [{n}], got {labels.dtype} {tuple(labels.shape)}")


def shard_teacher(op, student, indices, logprobs):
    """A sparse teacher's rows on a vocab-parallel op: ids (any int64: those outside [0, V_slice)
    belong to other slices) and float32 log-probs, [N, k]."""
    n = student.shape[0]
    if indices.dim() != 2 or indices.shape[0] != n or logprobs.shape != indices.shape:
        _fail(op, f"indices and logprobs must be [{n}, k], got {tuple(indices.shape)} and {tuple(logprobs.shape)}")
    if indices.dtype != torch.long or logprobs.dtype != torch.float32:
        _fail(op, "indices must be int64, logprobs float32", TypeError)


def finish(op, grad, student, stats, temperature):
    """dense_kd_finish's arguments: grad [N, V] in the student's gradient dtype, contiguous (it is
    finished in place), row_stats [N, 8]."""
    row_loss(op, student, None, temperature, -100, 0.0)
    if not grad.is_contiguous():
        _fail(op, "grad must be contiguous (it is finished in place)")
    if grad.shape != student.shape or grad.dtype != _ops.grad_dtype(student.dtype):
        _fail(op, f"grad must be {_ops.grad_dtype(student.dtype)} {tuple(student.shape)} (the student's gradient), "
                  f"got {grad.dtype} {tuple(grad.shape)}")
    row_stats(op, stats, student.shape[0], 8)


def dense_stats(student, teacher, temperature):
    """dense_kd_stats's arguments (every backend's Python layer)."""
    row_loss("dense_kd_stats", student, None, temperature, -100, 0.0)
    dense(student, teacher, "forward_kl", 0.5)


def dense_shard(student, teacher, labels, stats, divergence, temperature, beta, ignore_index):
    """dense_kd_shard's arguments: row_stats [N, 8] float64 (DENSE_ROW), labels of the slice."""
    row_loss("dense_kd_shard", student, None, temperature, ignore_index, 0.0)
    dense(student, teacher, divergence, beta)
    shard_labels("dense_kd_shard", labels, student.shape[0])
    row_stats("dense_kd_shard", stats, student.shape[0], len(_ops.DENSE_ROW))


def sparse_stats(student, indices, logprobs, temperature):
    """sparse_kd_stats's arguments."""
    row_loss("sparse_kd_stats", student, None, temperature, -100, 0.0)
    shard_teacher("sparse_kd_stats", student, indices, logprobs)


def sparse_shard(student, indices, logprobs, labels, stats, temperature, ignore_index):
    """sparse_kd_shard's arguments: row_stats [N, 8] float64 (SPARSE_ROW), labels of the slice."""
    row_loss("sparse_kd_shard", student, None, temperature, ignore_index, 0.0)
    shard_teacher("sparse_kd_shard", student, indices, logprobs)
    shard_labels("sparse_kd_shard", labels, student.shape[0])
    row_stats("sparse_kd_shard", stats, student.shape[0], len(_ops.SPARSE_ROW))
