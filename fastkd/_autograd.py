"""The autograd and fake-tensor glue shared by every fused op.

A fused op returns (loss [N], grad [N, V]) where grad[i] = d loss[i] / d input[i] was computed in
the forward pass. Backward only scales that kept gradient, in place, by grad_output [N]: no second
[N, V] buffer is ever allocated. The gradient is therefore consumed by the first backward, and a
second backward through the same graph (retain_graph=True) raises.
"""
import torch


def _setup_context(ctx, inputs, output):
    _, grad = output
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)  # else autograd builds an [N, V] of zeros for `grad`'s grad
    ctx.save_for_backward(grad)


def _backward(ctx, grad_loss, _grad_grad):
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0 and grad_loss.numel() > 0:
        raise RuntimeError(
            "fastkd: this loss was computed without a gradient (grad mode off, or the student "
            "did not require grad when the loss was computed); recompute it to backpropagate"
        )
    scale = grad_loss.unsqueeze(-1).to(grad.dtype)
    return (grad.mul_(scale),) + (None,) * (ctx.n_inputs - 1)


def register_fused(qualname: str, fake):
    """Register `fake` (shapes only) and the kept-gradient autograd for the op `qualname`."""
    torch.library.register_fake(qualname)(fake)
    torch.library.register_autograd(qualname, _backward, setup_context=_setup_context)
