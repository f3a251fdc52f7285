"""Backend "torch" of the op sample_teacher_draws (fastkd/_ops.py)."""
import torch

from .. import _op_checks
from ._rows import chunk_rows


def sample_teacher_draws(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float) -> torch.Tensor:
    """The first id whose running sum of exp(t / T - max) exceeds u * total, for each sorted
    uniform u ([N, S] -> [N, S] ids; -1 for a row with no finite logit)."""
    _op_checks.draws(logits, uniforms, temperature)
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
