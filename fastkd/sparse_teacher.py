"""Sparse teachers: `SparseTeacher`, `topk_teacher` and `sample_teacher` (docs/design.md section 1).

A sparse teacher keeps k entries of each row of the teacher's tempered distribution
p_T = softmax(t / T): their token ids, their exact log-probabilities (from the full vocabulary)
and, for top-k, the log of the mass outside them, computed in log space from the teacher's own
sums, so a tail of 1e-12 stays finite.

The work is the ops topk_teacher and sample_teacher_draws, one per backend (fastkd/backends.py).
Every backend draws samples by inverse CDF from the same sorted uniforms, so a generator gives the
same draws on each (up to a draw that lands within rounding of a CDF step).
"""
import torch

from . import _validate, backends
from ._math import not_a_number
from ._options import SparseTeacher, check_temperature


def _tempered(teacher_logits, temperature):
    _validate.check_logits("teacher_logits", teacher_logits)
    _validate.check_vocab("teacher_logits", teacher_logits)
    temperature = check_temperature(temperature)
    vocab = teacher_logits.shape[-1]
    return teacher_logits.reshape(-1, vocab), temperature, vocab


@torch.no_grad()
def topk_teacher(teacher_logits: torch.Tensor, k: int = 64, temperature: float = 2.0, *,
                 backend: str = "auto") -> SparseTeacher:
    """The k most probable ids of each row of softmax(teacher_logits / T), [..., V] -> [..., k],
    largest first, with their exact log-probs and the tail's log-mass. A row with a NaN or +inf
    logit has NaN log-probs and tail (its ids are unspecified)."""
    flat, temperature, vocab = _tempered(teacher_logits, temperature)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, V={vocab}], got {k!r}")
    op = backends.kernel("topk_teacher", backend, flat.device)
    indices, logprobs, tail = op(flat, k, temperature)
    lead = teacher_logits.shape[:-1]
    return SparseTeacher(indices.reshape(lead + (k,)), logprobs.reshape(lead + (k,)),
                         tail.reshape(lead), temperature, "topk")


@torch.no_grad()
def sample_teacher(teacher_logits: torch.Tensor, num_samples: int = 12, temperature: float = 2.0,
                   generator: torch.Generator | None = None, *, backend: str = "auto") -> SparseTeacher:
    """`num_samples` draws (with replacement) per row from softmax(teacher_logits / T), kept as
    the unique ids with log(count / num_samples), padded to num_samples entries with id 0 and
    logprob -inf (a row with no finite logit is all padding; a row with a NaN or +inf logit is one
    NaN entry, then padding). Used with the "renorm_teacher"
    tail, its gradient is an unbiased estimate of the dense forward-KL gradient."""
    flat, temperature, vocab = _tempered(teacher_logits, temperature)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    draws_op = backends.kernel("sample_teacher_draws", backend, flat.device)
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
    # a row with a NaN or +inf logit has no distribution to draw from: NaN, never a confident
    # one-hot or an empty row (docs/math.md; the cache writer refuses such rows)
    bad = not_a_number(flat).unsqueeze(-1)
    first = torch.arange(num_samples, device=ids.device) == 0  # one NaN entry (id 0), then padding
    logprobs = torch.where(bad, torch.where(first, float("nan"), float("-inf")), logprobs)
    uniq = torch.where(bad, 0, uniq)
    lead = teacher_logits.shape[:-1]
    tail = torch.full(lead, float("-inf"), dtype=torch.float32, device=flat.device)
    return SparseTeacher(uniq.reshape(lead + (num_samples,)), logprobs.reshape(lead + (num_samples,)),
                         tail, temperature, "sampled")


@torch.no_grad()
def expected_unique(teacher_logits: torch.Tensor, num_samples: int, temperature: float = 2.0) -> float:
    """The mean over rows of the expected number of unique ids among `num_samples` draws with
    replacement from softmax(teacher_logits / T): sum_i 1 - (1 - p_i)^num_samples (exact, fp64)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int (draws per row), got {num_samples!r}")
    flat, temperature, _ = _tempered(teacher_logits, temperature)
    flat = flat[torch.isfinite(flat).any(-1) & ~not_a_number(flat)]  # rows that have a distribution
    if not flat.shape[0]:
        return 0.0
    log_miss = torch.log1p(-torch.softmax(flat.double() / temperature, -1).clamp(max=1.0))  # log(1 - p_i)
    return float((-torch.expm1(num_samples * log_miss)).sum(-1).mean())


def draws_for_unique(teacher_logits: torch.Tensor, unique: float, temperature: float = 2.0,
                     max_draws: int = 255) -> int:
    """The fewest draws per row (at most `max_draws`) whose expected number of unique ids, averaged
    over these rows, reaches `unique` -- the `num_samples` that spends a unique-id budget (a cache's
    bytes follow its unique ids). Calibrate on a representative batch (a few thousand rows); when
    even `max_draws` falls short, `max_draws` (expected_unique says what it reaches)."""
    if isinstance(unique, bool) or not isinstance(unique, (int, float)) or not unique > 0:
        raise ValueError(f"unique must be a positive number, got {unique!r}")
    if isinstance(max_draws, bool) or not isinstance(max_draws, int) or not 1 <= max_draws <= 255:
        raise ValueError(f"max_draws must be an int in [1, 255], got {max_draws!r}")
    lo, hi = 1, max_draws  # expected_unique grows with the draws: the first d reaching `unique`
    if expected_unique(teacher_logits, hi, temperature) < unique:
        return max_draws
    while lo < hi:
        mid = (lo + hi) // 2
        if expected_unique(teacher_logits, mid, temperature) >= unique:
            hi = mid
        else:
            lo = mid + 1
    return lo
