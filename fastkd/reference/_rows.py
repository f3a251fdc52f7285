"""Row helpers of backend "torch" shared by its ops: the row-chunk loop, log-sum-exps in float64,
and the hard-label CE / ignored-row tail that every row-loss op ends with.

The torch backend runs wherever PyTorch runs, chunked over rows so it never holds more than one
chunk of temporaries (about CHUNK_ELEMENTS elements each) besides the outputs it returns.
"""
import torch

from .. import _ops
from .._math import NEG_INF, log_normaliser, max_sum, not_a_number  # noqa: F401  (the backend's row helpers)

CHUNK_ELEMENTS = 1 << 20  # elements per fp32 temporary: 4 MiB


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a vocabulary of `vocab` entries."""
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def finite_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with rows that have no finite entry replaced by zeros, mask of the other rows)."""
    ok = x.amax(-1) > NEG_INF
    return torch.where(ok.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device)), ok


def softmax_parts(x: torch.Tensor):
    """(softmax(x), float64 logsumexp(x) [.., 1]) over the last dim, formed as the kernels do:
    exp(x - max) / sum, with the sum in float64. (exp(x - logsumexp(x)) rounds x - lse to fp32
    first, a ~1e-6 error in the largest probabilities; a plain fp32 sum over a 128k vocabulary
    drifts by ~1e-6 too, the size of a small KL.) Rows must have a finite entry."""
    m = x.amax(-1, keepdim=True)
    e = (x - m).exp()
    total = e.sum(-1, keepdim=True, dtype=torch.float64)
    return e * (1.0 / total).to(x.dtype), m.double() + total.log()


def finish_rows(s, s_ok, labels, ignore_index, w, loss, grad, poisoned=None):
    """Add the hard-label CE term (temperature 1) to a chunk's KD loss [n] and gradient [n, V]
    (or None), zero the rows that are ignored or have no finite student logit, and make NaN the
    kept rows that read a NaN or +inf (`poisoned` [n], besides the student's own)."""
    acc = loss.dtype
    zero = torch.zeros((), dtype=acc, device=s.device)
    poisoned = not_a_number(s) if poisoned is None else poisoned | not_a_number(s)
    s_ok = s_ok | poisoned
    keep = s_ok
    if labels is not None:
        keep = keep & (labels != ignore_index)
        if w.hard > 0:
            safe = torch.where(labels == ignore_index, 0, labels).unsqueeze(-1)
            s1 = finite_rows(s.to(acc))[0]
            q1, l1 = softmax_parts(s1)
            loss = loss + w.hard * (l1.squeeze(-1) - s1.gather(-1, safe).squeeze(-1).double()).to(acc)
            if grad is not None:
                grad = grad + w.hard_grad * q1
                grad.scatter_add_(-1, safe, torch.full_like(safe, -w.hard_grad, dtype=acc))
    nan = torch.full((), float("nan"), dtype=acc, device=s.device)
    loss = torch.where(keep, torch.where(poisoned, nan, loss), zero)
    if grad is not None:
        grad = torch.where(keep.unsqueeze(-1), torch.where(poisoned.unsqueeze(-1), nan, grad), zero)
    return loss, grad


def chunked_rows(student, labels, compute_grad, chunk):
    """Run `chunk(rows, labels_of_rows) -> (loss [n], grad [n, V] or None)` over row chunks of
    `student` [N, V]; returns the op's (loss [N], grad [N, V] or an empty tensor)."""
    n, vocab = student.shape
    loss, grad = _ops.row_loss_outputs(student, compute_grad)
    step = chunk_rows(vocab)
    for r in range(0, n, step):
        rows = slice(r, r + step)
        loss[rows], g = chunk(rows, None if labels is None else labels[rows])
        if compute_grad:
            grad[rows] = g
    return loss, grad
