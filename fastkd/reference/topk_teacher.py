"""Backend "torch" of the op topk_teacher (fastkd/_ops.py)."""
import torch

from .. import _op_checks
from ._rows import NEG_INF, chunk_rows, log_normaliser, not_a_number


def topk_teacher(logits: torch.Tensor, k: int, temperature: float):
    """logits [N, V] -> (ids [N, k] largest first, logprobs [N, k] fp32, tail_logmass [N] fp32);
    the tail is summed over itself in log space (never 1 - sum of the top k)."""
    _op_checks.topk(logits, k, temperature)
    n, vocab = logits.shape
    indices = torch.empty(n, k, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(n, k, dtype=torch.float32, device=logits.device)
    tail = torch.empty(n, dtype=torch.float32, device=logits.device)
    step = chunk_rows(vocab)
    for r in range(0, n, step):
        b = logits[r:r + step].float() * (1.0 / temperature)
        lse = log_normaliser(b)
        lse = torch.where(lse > NEG_INF, lse, 0.0)  # no finite entry: every log-prob is -inf
        vals, ids = b.topk(k, dim=-1)
        indices[r:r + step] = ids
        logprobs[r:r + step] = (vals.double() - lse).float()
        rest = b.scatter(-1, ids, NEG_INF)
        tail[r:r + step] = (log_normaliser(rest) - lse).squeeze(-1).float()
        bad = not_a_number(b)  # a NaN or +inf logit: the row is NaN (docs/math.md)
        logprobs[r:r + step] = torch.where(bad.unsqueeze(-1), float("nan"), logprobs[r:r + step])
        tail[r:r + step] = torch.where(bad, float("nan"), tail[r:r + step])
    return indices, logprobs, tail
