"""An independent oracle: the textbook formulas of docs/design.md section 2, differentiated by autograd.

Nothing here is shared with fastkd's implementation: no closed-form gradient, no chunking.
Gradients are valid for inputs without -inf (the edge-case tests check those separately).
"""
import torch
import torch.nn.functional as F


def divergence_rows(s, t, temperature, divergence, beta):
    lq = F.log_softmax(s / temperature, dim=-1)
    lp = F.log_softmax(t / temperature, dim=-1)
    q, p = lq.exp(), lp.exp()

    def kl(a, la, lb):  # KL(a || b) with log-probs, 0 log 0 = 0
        return torch.where(a > 0, a * (la - lb), torch.zeros_like(a)).sum(-1)

    if divergence == "forward_kl":
        return kl(p, lp, lq)
    if divergence == "reverse_kl":
        return kl(q, lq, lp)
    if divergence == "jsd":
        lm = (beta * p + (1 - beta) * q).log()
        return beta * kl(p, lp, lm) + (1 - beta) * kl(q, lq, lm)
    if divergence == "skew_forward_kl":
        return kl(p, lp, (beta * p + (1 - beta) * q).log())
    if divergence == "skew_reverse_kl":
        return kl(q, lq, (beta * q + (1 - beta) * p).log())
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(divergence)


def kd_loss(s, t, *, temperature=1.0, divergence="forward_kl", beta=0.5, reduction="mean",
            labels=None, ignore_index=-100, hard_weight=0.0, scale_by_t2=True):
    """Same contract as fastkd.kd_loss; computes in s's dtype (use float64)."""
    vocab = s.shape[-1]
    lead = s.shape[:-1]
    s2, t2 = s.reshape(-1, vocab), t.reshape(-1, vocab)
    kd = divergence_rows(s2, t2, temperature, divergence, beta)
    if scale_by_t2:
        kd = kd * temperature**2
    rows = (1 - hard_weight) * kd
    keep = torch.ones_like(rows, dtype=torch.bool)
    if labels is not None:
        lab = labels.reshape(-1)
        keep = lab != ignore_index
        if hard_weight > 0:
            ce = F.cross_entropy(s2, lab, ignore_index=ignore_index, reduction="none")
            rows = rows + hard_weight * ce
        rows = torch.where(keep, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(lead)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / keep.sum().clamp_min(1)
