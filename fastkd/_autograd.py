"""The autograd glue shared by every fused row-loss op (dense_kd, sparse_kd, on every backend).

A fused op `op(x, *rest, grad_scale, compute_grad) -> (loss [N], grad [N, V])` computes, in its
forward pass, grad[i] = grad_scale * d loss[i] / d x[i], grad_scale being the weight the reduction
gives each row. The first backward scales that kept gradient in place by grad_output / grad_scale
-- nothing at all in the usual case, loss.backward() of the reduced loss on the CPU, where
grad_output is that weight -- and hands the same buffer on: no second [N, V] buffer is allocated.
A repeated backward through the same graph (retain_graph=True, gradcheck), or one after a
forward with compute_grad=False, recomputes the gradient from the op's inputs, which the op
keeps references to (no copies) until the graph is freed.
"""
import torch


def _setup_context(ctx, inputs, output):
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)  # else autograd builds an [N, V] of zeros for `grad`'s grad
    ctx.kept = grad
    ctx.tensor_slots = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
    ctx.others = [a for a in inputs if not isinstance(a, torch.Tensor)]
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_slots))


def _inputs(ctx):
    tensors = iter(ctx.saved_tensors)
    others = iter(ctx.others)
    return [next(tensors) if i in ctx.tensor_slots else next(others) for i in range(ctx.n_inputs)]


def make_backward(op):
    """The backward of `op`, whose last argument is compute_grad."""

    def backward(ctx, grad_loss, _grad_grad):
        if grad_loss is None:  # the loss did not reach the output: no gradient, nothing consumed
            return (None,) * ctx.n_inputs
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise NotImplementedError(
                "fastkd's fused losses do not support double backward (create_graph=True, e.g. a "
                "gradient penalty through the KD loss): their gradient is computed in the forward "
                "pass and has no graph of its own, so its own gradient would silently be missing. "
                "Differentiate the KD loss once (create_graph=False).")
        grad, ctx.kept = ctx.kept, None
        inputs = _inputs(ctx)
        if grad is None or grad.shape != inputs[0].shape:
            # A repeated backward (the kept gradient was consumed), or a forward run with
            # compute_grad=False: compute the gradient now.
            grad = op(*inputs[:-1], True)[1]
        done = (None,) * (ctx.n_inputs - 1)
        grad_scale, dtype = inputs[-2], inputs[0].dtype
        # The factor is applied in the kept gradient's dtype (fp32 for fp16 logits), then the
        # result is cast once (a no-op when the dtypes agree): GradScaler's 2^16 and the 1/N of
        # "mean" never meet fp16's range on the way.
        factor = (grad_loss / grad_scale).unsqueeze(-1).to(grad.dtype)
        # Eager: scale in place and hand the buffer on. Traced (torch.compile / AOTAutograd see
        # fake or functional tensor subclasses): a graph may not mutate a forward output, so
        # scale out of place and let the compiler plan the buffers.
        if type(grad) is not torch.Tensor or type(grad_loss) is not torch.Tensor:
            return ((grad * factor).to(dtype),) + done
        if grad_loss.device.type == "cpu" and bool((grad_loss == grad_scale).all()):
            return (grad.to(dtype),) + done  # already scaled by the kernel (a CPU read, no device sync)
        if grad.dtype != dtype:  # fp16: the fp32 product written straight into fp16, one pass
            return (torch.mul(grad, factor, out=torch.empty_like(grad, dtype=dtype)),) + done
        return (grad.mul_(factor),) + done

    return backward


def register_autograd(name: str):
    """Register the kept-gradient autograd for the row-loss op torch.ops.fastkd.<name>."""
    op = getattr(torch.ops.fastkd, name)
    torch.library.register_autograd(f"fastkd::{name}", make_backward(op), setup_context=_setup_context)
