"""Sparse teachers: `SparseTeacher`, `topk_teacher` and `sample_teacher` (DESIGN.md section 1).

A sparse teacher keeps k entries of each row of the teacher's tempered distribution
p_T = softmax(t / T): their token ids, their exact log-probabilities (from the full vocabulary)
and, for top-k, the log of the mass outside them, computed in log space from the teacher's own
sums, so a tail of 1e-12 stays finite.
"""
from typing import NamedTuple

import torch

from . import _validate
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


def _tempered(teacher_logits, temperature):
    _validate.check_logits("teacher_logits", teacher_logits)
    temperature = _validate.check_temperature(temperature)
    vocab = teacher_logits.shape[-1]
    return teacher_logits.reshape(-1, vocab), temperature, vocab


def _log_normaliser(b: torch.Tensor) -> torch.Tensor:
    """float64 logsumexp over the last dim ([n, 1]); -inf for a row with no finite entry."""
    m = b.amax(-1, keepdim=True)
    safe = torch.where(m > float("-inf"), m, torch.zeros_like(m))
    return safe.double() + (b - safe).exp().sum(-1, keepdim=True, dtype=torch.float64).log()


@torch.no_grad()
def topk_teacher(teacher_logits: torch.Tensor, k: int = 64, temperature: float = 2.0) -> SparseTeacher:
    """The k most probable ids of each row of softmax(teacher_logits / T), [..., V] -> [..., k]."""
    flat, temperature, vocab = _tempered(teacher_logits, temperature)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, V={vocab}], got {k!r}")
    n = flat.shape[0]
    indices = torch.empty(n, k, dtype=torch.long, device=flat.device)
    logprobs = torch.empty(n, k, dtype=torch.float32, device=flat.device)
    tail = torch.empty(n, dtype=torch.float32, device=flat.device)
    step = chunk_rows(vocab)
    for r in range(0, n, step):
        b = flat[r:r + step].float() * (1.0 / temperature)
        lse = _log_normaliser(b)
        lse = torch.where(lse > float("-inf"), lse, 0.0)  # no finite entry: every log-prob is -inf
        vals, ids = b.topk(k, dim=-1)
        indices[r:r + step] = ids
        logprobs[r:r + step] = (vals.double() - lse).float()
        rest = b.scatter(-1, ids, float("-inf"))  # the tail, summed directly (not 1 - sum top-k)
        tail[r:r + step] = (_log_normaliser(rest) - lse).squeeze(-1).float()
    lead = teacher_logits.shape[:-1]
    return SparseTeacher(indices.reshape(lead + (k,)), logprobs.reshape(lead + (k,)),
                         tail.reshape(lead), temperature, "topk")


@torch.no_grad()
def sample_teacher(teacher_logits: torch.Tensor, num_samples: int = 12, temperature: float = 2.0,
                   generator: torch.Generator | None = None) -> SparseTeacher:
    """`num_samples` draws (with replacement) per row from softmax(teacher_logits / T), kept as
    the unique ids with log(count / num_samples), padded to num_samples entries with id 0 and
    logprob -inf. Used with the "renorm_teacher" tail, its gradient is an unbiased estimate of
    the dense forward-KL gradient."""
    flat, temperature, vocab = _tempered(teacher_logits, temperature)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    n = flat.shape[0]
    ids = torch.empty(n, num_samples, dtype=torch.long, device=flat.device)
    step = chunk_rows(vocab)
    for r in range(0, n, step):
        probs = torch.softmax(flat[r:r + step].float() * (1.0 / temperature), dim=-1)
        ids[r:r + step] = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
    ids = ids.sort(-1).values
    start = torch.ones_like(ids, dtype=torch.bool)
    start[:, 1:] = ids[:, 1:] != ids[:, :-1]
    slot = start.long().cumsum(-1) - 1  # which unique id each draw belongs to
    counts = torch.zeros_like(ids).scatter_add_(-1, slot, torch.ones_like(ids))
    uniq = torch.zeros_like(ids).scatter_(-1, slot, ids)
    logprobs = torch.where(counts > 0, (counts.float() / num_samples).log(),
                           torch.full((), float("-inf"), device=ids.device))
    lead = teacher_logits.shape[:-1]
    tail = torch.full(lead, float("-inf"), dtype=torch.float32, device=flat.device)
    return SparseTeacher(uniq.reshape(lead + (num_samples,)), logprobs.reshape(lead + (num_samples,)),
                         tail, temperature, "sampled")
