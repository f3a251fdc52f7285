"""Sparse teachers: `SparseTeacher`, `topk_teacher` and `sample_teacher` (DESIGN.md section 1).

A sparse teacher keeps k entries of each row of the teacher's tempered distribution
p_T = softmax(t / T): their token ids, their exact log-probabilities (from the full vocabulary)
and, for top-k, the log of the mass outside them, computed in log space from the teacher's own
sums, so a tail of 1e-12 stays finite.

Backends: "torch" (the chunked PyTorch below, ops fastkd::topk_teacher_torch and
fastkd::sample_teacher_draws_torch) and "cpu" (csrc/cpu/teacher_kernel.h: one read of each row).
Both draw samples by inverse CDF from the same sorted uniforms, so a generator gives the same
draws on either (up to a draw that lands within rounding of a CDF step).
"""
from typing import NamedTuple

import torch

from . import _validate, backends
from .reference import chunk_rows

KINDS = ("topk", "sampled")


class SparseTeacher(NamedTuple):
    """indices [..., k] int64 token ids; logprobs [..., k] float32 log p_T of them (-inf marks
    padding); tail_logmass [...] float32 log of p_T's mass outside `indices` (-inf: none);
    temperature: the T of p_T; kind: "topk" or "sampled"."""

    indices: torch.Tensor
    logprobs: torch.Tensor
    tail_logmass: torch.Tensor
    temperature: float
    kind: str


_OPS = {"torch": ("topk_teacher_torch", "sample_teacher_draws_torch"),
        "cpu": ("topk_teacher", "sample_teacher_draws")}


def _log_normaliser(b: torch.Tensor) -> torch.Tensor:
    """float64 logsumexp over the last dim ([n, 1]); -inf for a row with no finite entry."""
    m = b.amax(-1, keepdim=True)
    safe = torch.where(m > float("-inf"), m, torch.zeros_like(m))
    return safe.double() + (b - safe).exp().sum(-1, keepdim=True, dtype=torch.float64).log()


def _topk_torch(logits: torch.Tensor, k: int, temperature: float):
    """Backend "torch" of fastkd::topk_teacher: logits [N, V] -> (ids [N, k], logprobs [N, k], tail [N])."""
    n, vocab = logits.shape
    indices = torch.empty(n, k, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(n, k, dtype=torch.float32, device=logits.device)
    tail = torch.empty(n, dtype=torch.float32, device=logits.device)
    step = chunk_rows(vocab)
    for r in range(0, n, step):
        b = logits[r:r + step].float() * (1.0 / temperature)
        lse = _log_normaliser(b)
        lse = torch.where(lse > float("-inf"), lse, 0.0)  # no finite entry: every log-prob is -inf
        vals, ids = b.topk(k, dim=-1)
        indices[r:r + step] = ids
        logprobs[r:r + step] = (vals.double() - lse).float()
        rest = b.scatter(-1, ids, float("-inf"))  # the tail, summed directly (not 1 - sum top-k)
        tail[r:r + step] = (_log_normaliser(rest) - lse).squeeze(-1).float()
    return indices, logprobs, tail


def _draws_torch(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float) -> torch.Tensor:
    """Backend "torch" of fastkd::sample_teacher_draws: the first id whose running sum of
    exp(t / T - max) exceeds u * total, for each sorted uniform u ([N, S] -> [N, S] ids)."""
    n, vocab = logits.shape
    draws = torch.empty(uniforms.shape, dtype=torch.long, device=logits.device)
    step = chunk_rows(vocab)
    for r in range(0, n, step):
        b = logits[r:r + step].float() * (1.0 / temperature)
        m = b.amax(-1, keepdim=True)
        ok = m > float("-inf")
        e = (b - torch.where(ok, m, 0.0)).exp()
        cdf = e.double().cumsum(-1)
        ids = torch.searchsorted(cdf, uniforms[r:r + step] * cdf[:, -1:], right=True)
        positive = torch.arange(vocab, device=b.device).expand_as(e).masked_fill(e == 0, -1)
        ids = torch.minimum(ids, positive.amax(-1, keepdim=True))  # u * total lost to rounding
        draws[r:r + step] = torch.where(ok, ids, -1)
    return draws


def _register():
    lib = "CompositeExplicitAutograd"
    torch.library.impl("fastkd::topk_teacher_torch", lib)(_topk_torch)
    torch.library.impl("fastkd::sample_teacher_draws_torch", lib)(_draws_torch)
    for name in _OPS["torch"] + _OPS["cpu"]:
        if "topk" in name:
            def fake(logits, k, temperature):
                n = logits.shape[0]
                return (logits.new_empty(n, k, dtype=torch.long), logits.new_empty(n, k, dtype=torch.float32),
                        logits.new_empty(n, dtype=torch.float32))
        else:
            def fake(logits, uniforms, temperature):
                return uniforms.new_empty(uniforms.shape, dtype=torch.long)
        torch.library.register_fake(f"fastkd::{name}")(fake)


_register()


def _tempered(teacher_logits, temperature):
    _validate.check_logits("teacher_logits", teacher_logits)
    temperature = _validate.check_temperature(temperature)
    vocab = teacher_logits.shape[-1]
    return teacher_logits.reshape(-1, vocab), temperature, vocab


def _ops(backend, device, op):
    name = backends.resolve(backend, device, implemented=tuple(_OPS), op=op)
    return [getattr(torch.ops.fastkd, o) for o in _OPS[name]]


@torch.no_grad()
def topk_teacher(teacher_logits: torch.Tensor, k: int = 64, temperature: float = 2.0, *,
                 backend: str = "auto") -> SparseTeacher:
    """The k most probable ids of each row of softmax(teacher_logits / T), [..., V] -> [..., k],
    largest first, with their exact log-probs and the tail's log-mass."""
    flat, temperature, vocab = _tempered(teacher_logits, temperature)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, V={vocab}], got {k!r}")
    topk_op, _ = _ops(backend, flat.device, "topk_teacher")
    indices, logprobs, tail = topk_op(flat, k, temperature)
    lead = teacher_logits.shape[:-1]
    return SparseTeacher(indices.reshape(lead + (k,)), logprobs.reshape(lead + (k,)),
                         tail.reshape(lead), temperature, "topk")


@torch.no_grad()
def sample_teacher(teacher_logits: torch.Tensor, num_samples: int = 12, temperature: float = 2.0,
                   generator: torch.Generator | None = None, *, backend: str = "auto") -> SparseTeacher:
    """`num_samples` draws (with replacement) per row from softmax(teacher_logits / T), kept as
    the unique ids with log(count / num_samples), padded to num_samples entries with id 0 and
    logprob -inf (a row with no finite logit is all padding). Used with the "renorm_teacher"
    tail, its gradient is an unbiased estimate of the dense forward-KL gradient."""
    flat, temperature, vocab = _tempered(teacher_logits, temperature)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    _, draws_op = _ops(backend, flat.device, "sample_teacher")
    n = flat.shape[0]
    uniforms = torch.rand(n, num_samples, dtype=torch.float64, device=flat.device, generator=generator)
    ids = draws_op(flat, uniforms.sort(-1).values, temperature)  # ascending ids
    start = torch.ones_like(ids, dtype=torch.bool)
    start[:, 1:] = ids[:, 1:] != ids[:, :-1]
    slot = start.long().cumsum(-1) - 1  # which unique id each draw belongs to
    counts = torch.zeros_like(ids).scatter_add_(-1, slot, (ids >= 0).long())
    uniq = torch.zeros_like(ids).scatter_(-1, slot, ids.clamp(min=0))
    logprobs = torch.where(counts > 0, (counts.float() / num_samples).log(),
                           torch.full((), float("-inf"), device=ids.device))
    lead = teacher_logits.shape[:-1]
    tail = torch.full(lead, float("-inf"), dtype=torch.float32, device=flat.device)
    return SparseTeacher(uniq.reshape(lead + (num_samples,)), logprobs.reshape(lead + (num_samples,)),
                         tail, temperature, "sampled")
