"""The kept-gradient autograd, the one of every fastkd loss: the row-loss ops (dense_kd, sparse_kd,
on every backend, registered with torch.library) and the losses that are not one op -- the
vocab-parallel rows and fused linear -- through KeptRows.

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


def _no_double_backward():
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise NotImplementedError(
            "fastkd's fused losses do not support double backward (create_graph=True, e.g. a "
            "gradient penalty through the KD loss): their gradient is computed in the forward "
            "pass and has no graph of its own, so its own gradient would silently be missing. "
            "Differentiate the KD loss once (create_graph=False).")


def scale_kept(grad, grad_loss, grad_scale, dtype):
    """A kept gradient [N, ...] (grad_scale times d loss[i] / d x[i], row by row) times the upstream
    grad_loss [N] / grad_scale, in `dtype`. The factor is applied in the kept gradient's dtype (fp32
    for fp16 logits), then the result is cast once (a no-op when the dtypes agree): GradScaler's
    2^16 and the 1/N of "mean" never meet fp16's range on the way."""
    factor = (grad_loss / grad_scale).reshape(-1, *([1] * (grad.dim() - 1))).to(grad.dtype)
    # Eager: scale in place and hand the buffer on. Traced (torch.compile / AOTAutograd see fake or
    # functional tensor subclasses): a graph may not mutate a forward output, so scale out of place
    # and let the compiler plan the buffers.
    if type(grad) is not torch.Tensor or type(grad_loss) is not torch.Tensor:
        return (grad * factor).to(dtype)
    if grad_loss.device.type == "cpu" and bool((grad_loss == grad_scale).all()):
        return grad.to(dtype)  # already scaled by the kernel (a CPU read, no device sync)
    if grad.dtype != dtype:  # fp16: the fp32 product written straight into fp16, one pass
        return torch.mul(grad, factor, out=torch.empty_like(grad, dtype=dtype))
    return grad.mul_(factor)


def make_backward(op):
    """The backward of `op`, whose last argument is compute_grad."""

    def backward(ctx, grad_loss, _grad_grad):
        if grad_loss is None:  # the loss did not reach the output: no gradient, nothing consumed
            return (None,) * ctx.n_inputs
        _no_double_backward()
        grad, ctx.kept = ctx.kept, None
        inputs = _inputs(ctx)
        if grad is None or grad.shape != inputs[0].shape:
            # A repeated backward (the kept gradient was consumed), or a forward run with
            # compute_grad=False: compute the gradient now.
            grad = op(*inputs[:-1], True)[1]
        done = (None,) * (ctx.n_inputs - 1)
        return (scale_kept(grad, grad_loss, inputs[-2], inputs[0].dtype),) + done

    return backward


def register_autograd(name: str):
    """Register the kept-gradient autograd for the row-loss op torch.ops.fastkd.<name>."""
    op = getattr(torch.ops.fastkd, name)
    torch.library.register_autograd(f"fastkd::{name}", make_backward(op), setup_context=_setup_context)


class KeptRows(torch.autograd.Function):
    """Rows [N] of a loss that is not one op, whose gradients its forward computes and keeps: a
    vocab-parallel slice's rows, fused linear's (gradients of the hidden states, head and bias).

    KeptRows.apply(run, grad_scale, uniform, replay, per_row, *inputs):
      run(compute_grad, row_scale) -> (rows [N], grads): one gradient per input (None where not
        needed), each grad_scale times d rows / d input, times row_scale [N] per row when given;
      per_row[i]: the first dimension of input i's gradient is the rows' (so it scales row by row);
        else it is a sum over the rows, which only a uniform factor can scale;
      uniform: the upstream gradient is the same for every row (reductions "mean" and "sum");
      replay: run() may run again in backward (False: its collectives cannot be replayed).
    The gradients are computed in forward when backward can scale them (all per-row, or a uniform
    factor); else backward runs run() once with the row factors. A second backward of a retained
    graph runs it again too (the first handed the kept gradients out, in place)."""

    @staticmethod
    def forward(ctx, run, grad_scale, uniform, replay, per_row, *inputs):
        need = tuple(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs)
        eager = any(need) and (uniform or all(p for p, n in zip(per_row, need) if n))
        rows, grads = run(eager, None)
        ctx.kept = grads if eager else None
        ctx.run, ctx.grad_scale, ctx.uniform, ctx.replay, ctx.per_row = run, grad_scale, uniform, replay, per_row
        ctx.dtypes = [x.dtype if isinstance(x, torch.Tensor) else None for x in inputs]
        # saved so that autograd refuses a backward after an in-place change of an input
        ctx.save_for_backward(*inputs)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        _no_double_backward()
        grads, ctx.kept = ctx.kept, None
        if grads is None:
            if not ctx.replay:
                raise RuntimeError("a vocab-parallel fastkd loss keeps its gradient for one backward; run the "
                                   "forward again (retain_graph=True cannot replay its collectives)")
            ctx.saved_tensors  # noqa: B018 -- raises if an input changed in place since forward
            _, grads = ctx.run(True, grad_rows / ctx.grad_scale)
            out = [None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        else:
            out = []
            for g, dt, per_row in zip(grads, ctx.dtypes, ctx.per_row):
                if g is None:
                    out.append(None)
                elif per_row:
                    out.append(scale_kept(g, grad_rows, ctx.grad_scale, dt))
                else:  # a sum over the rows: the factor is uniform (ctx.uniform)
                    out.append(scale_kept(g.unsqueeze(0), grad_rows[:1], ctx.grad_scale, dt).squeeze(0)
                               if grad_rows.numel() else g.to(dt))
        return (None, None, None, None, None) + tuple(out)
