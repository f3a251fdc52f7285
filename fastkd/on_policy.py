"""`fastkd.sampled_reverse_kl`: the reverse KL of a student from a teacher on sequences the student
sampled itself, when the teacher gives only the log-probabilities of the sampled tokens (a server,
a teacher too large to return rows) -- on-policy distillation (Agarwal et al., ICLR 2024; the
sampled-token recipe of later on-policy distillation work).

For a sequence x ~ q (the student), the sequence-level reverse KL is

    KL(q || p) = E_{x ~ q} [ sum_t c_t ],     c_t = log q(x_t | x_<t) - log p(x_t | x_<t),

and its gradient (the score-function identity; E_q[grad log q(x_t | x_<t)] = 0 removes the
direct term) is

    grad KL = E_{x ~ q} [ sum_t C_t grad log q(x_t | x_<t) ],   C_t = sum_{t' >= t} c_t'   (cost to go).

`sampled_reverse_kl` returns, over the sampled sequences, the Monte Carlo estimate of KL as its
value and this estimate of the gradient as its gradient: unbiased (tests/test_on_policy.py checks
it against the exact gradient on a tiny vocabulary). Its variance is that of a REINFORCE
estimator: it grows with the sequence length (C_t sums up to T terms) and with how far the
student is from the teacher; more sequences per prompt shrink it as 1/n. `reward_to_go=False`
uses C_t = c_t alone (the per-token advantage log p_T(x_t) - log q(x_t) of the common recipe):
lower variance, but it drops how a token changes the later tokens' distributions, so it is the
gradient of the per-token reverse KL at the visited prefixes, biased for the sequence-level one.
With the teacher's whole rows at hand, the exact per-token reverse KL is
`fastkd.kd_loss(..., divergence="reverse_kl")` (or the fused forms) on the sampled sequences.
"""
import torch


def sampled_reverse_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask=None, *,
                       reward_to_go: bool = True, reduction: str = "mean") -> torch.Tensor:
    """student_logprobs [B, T]: log q(x_t | x_<t) of the student's own sampled tokens, with their
    graph; teacher_logprobs [B, T]: log p(x_t | x_<t) from the teacher (no gradient is taken
    through it); mask [B, T] bool or 0/1: the completion tokens (prompt and padding are False).

    Returns the estimate of the sequence-level reverse KL, sum_t (log q - log p) over each
    sequence's tokens: "mean" over the sequences, "sum", or "none" ([B]). Its gradient is the
    unbiased estimate of the reverse KL's gradient (reward_to_go=True; see the module docs)."""
    if not isinstance(student_logprobs, torch.Tensor) or student_logprobs.dim() != 2:
        raise ValueError(f"student_logprobs must be a [B, T] tensor, got {getattr(student_logprobs, 'shape', None)}")
    if not isinstance(teacher_logprobs, torch.Tensor) or teacher_logprobs.shape != student_logprobs.shape:
        raise ValueError(f"teacher_logprobs must have student_logprobs' shape {tuple(student_logprobs.shape)}, "
                         f"got {tuple(getattr(teacher_logprobs, 'shape', ()))}")
    if not student_logprobs.is_floating_point():
        raise TypeError(f"student_logprobs must be floating point, got {student_logprobs.dtype}")
    if mask is None:
        mask = torch.ones_like(student_logprobs, dtype=torch.bool)
    elif not isinstance(mask, torch.Tensor) or mask.shape != student_logprobs.shape:
        raise ValueError(f"mask must be a [B, T] tensor like student_logprobs, got {getattr(mask, 'shape', None)}")
    if not isinstance(reward_to_go, bool):
        raise TypeError(f"reward_to_go must be a bool, got {reward_to_go!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    keep = mask.to(torch.bool)
    dtype = torch.promote_types(student_logprobs.dtype, torch.float32)
    lq = torch.where(keep, student_logprobs.to(dtype), 0.0)
    lp = torch.where(keep, teacher_logprobs.detach().to(dtype), 0.0)
    cost = (lq - lp).detach()  # c_t, 0 off the mask
    if reward_to_go:  # C_t = sum_{t' >= t} c_t', a reversed cumulative sum
        cost = cost.flip(-1).cumsum(-1).flip(-1)
    estimate = (lq - lp).detach().sum(-1)  # [B]: the sampled sequences' log-ratios
    surrogate = (torch.where(keep, cost, 0.0) * lq).sum(-1)  # its gradient is the estimator
    per_sequence = estimate + (surrogate - surrogate.detach())
    if reduction == "none":
        return per_sequence
    # (the mean of no sequences is 0, as every fastkd "mean" over no kept row: never 0 / 0)
    return per_sequence.sum() if reduction == "sum" else per_sequence.sum() / max(per_sequence.shape[0], 1)
