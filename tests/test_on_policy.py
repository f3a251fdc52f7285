"""fastkd.sampled_reverse_kl: on a tiny autoregressive model (V = 3, T = 3, a table of logits per
prefix) whose sequence-level reverse KL is computed exactly by enumerating all V^T sequences, the
estimator's value and gradient, averaged over many seeded samples, match the exact ones within
5 standard errors; the per-token advantage alone (reward_to_go=False) does not; masked positions
get no gradient."""
import itertools

import pytest
import torch

import fastkd

V, T = 3, 3
PREFIXES = [p for n in range(T) for p in itertools.product(range(V), repeat=n)]
ROW = {p: i for i, p in enumerate(PREFIXES)}  # prefix -> row of the logits table


def _tables():
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
    teacher = torch.randn(len(PREFIXES), V, generator=g, dtype=torch.float64) * 1.5
    return student, teacher


def _exact(student, teacher):
    """KL(q || p) over all V^T sequences, exactly."""
    lq, lp = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    total = 0
    for x in itertools.product(range(V), repeat=T):
        rows = [ROW[x[:t]] for t in range(T)]
        log_q = sum(lq[r, x[t]] for t, r in enumerate(rows))
        log_p = sum(lp[r, x[t]] for t, r in enumerate(rows))
        total = total + log_q.exp() * (log_q - log_p)
    return total


def _sample(student, n, g):
    """n sequences from q -> the rows of their prefixes [n, T] and their tokens [n, T]."""
    probs = torch.softmax(student.detach(), -1)
    tokens = torch.zeros(n, T, dtype=torch.long)
    rows = torch.zeros(n, T, dtype=torch.long)
    index = {p: ROW[p] for p in PREFIXES}
    prefix_row = torch.zeros(n, dtype=torch.long)  # the empty prefix
    for t in range(T):
        rows[:, t] = prefix_row
        tokens[:, t] = torch.multinomial(probs[prefix_row], 1, generator=g).squeeze(-1)
        if t + 1 < T:  # the row of the prefix x_<=t
            prefix_row = torch.tensor([index[tuple(tokens[i, :t + 1].tolist())] for i in range(n)])
    return rows, tokens


def _estimates(reward_to_go, batches=40, per_batch=1000):
    student, teacher = _tables()
    g = torch.Generator().manual_seed(1)
    values, grads = [], []
    for _ in range(batches):
        rows, tokens = _sample(student, per_batch, g)
        lq = torch.log_softmax(student, -1)[rows, tokens]
        lp = torch.log_softmax(teacher, -1)[rows, tokens]
        loss = fastkd.sampled_reverse_kl(lq, lp, reward_to_go=reward_to_go)
        (grad,) = torch.autograd.grad(loss, student)
        values.append(loss.detach())
        grads.append(grad)
    exact = _exact(student, teacher)
    (exact_grad,) = torch.autograd.grad(exact, student)
    return torch.stack(values), torch.stack(grads), exact.detach(), exact_grad


def test_the_estimate_and_its_gradient_are_unbiased():
    values, grads, exact, exact_grad = _estimates(reward_to_go=True)
    k = values.shape[0]
    se = values.std() / k ** 0.5
    assert abs(values.mean() - exact) < 5 * se, (values.mean(), exact, se)
    mean, se = grads.mean(0), grads.std(0) / k ** 0.5
    assert exact_grad.abs().max() > 0.05  # a gradient worth estimating
    assert ((mean - exact_grad).abs() < 5 * se + 1e-9).all(), ((mean - exact_grad).abs() / se).max()


def test_the_per_token_advantage_alone_is_biased():
    """What the test above can catch: without the cost to go, the gradient misses how a token
    moves the later tokens' distributions."""
    _, grads, _, exact_grad = _estimates(reward_to_go=False)
    mean, se = grads.mean(0), grads.std(0) / grads.shape[0] ** 0.5
    assert ((mean - exact_grad).abs() > 8 * se).any()


def test_masked_positions_get_no_gradient_and_bad_input_is_refused():
    lq = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    lp = torch.randn(2, 5, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    loss = fastkd.sampled_reverse_kl(lq, lp, mask)
    (grad,) = torch.autograd.grad(loss, lq)
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).all()
    want = ((lq - lp) * mask).sum(-1).mean()
    torch.testing.assert_close(loss, want)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        fastkd.sampled_reverse_kl(lq, lp[:, :3])
    with pytest.raises(ValueError, match="reduction"):
        fastkd.sampled_reverse_kl(lq, lp, reduction="avg")
