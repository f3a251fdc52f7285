"""The two causal-LM losses of fastkd.hf, from the captured hidden states and head (capture.py):
the KD loss against a teacher model, a SparseTeacher or a callable returning one, and the
sampled-token reverse KL of the student's own samples. Conventions: fastkd/hf/__init__.py."""
import torch

from ..fused_linear_kd import fused_linear_kd_loss
from ..on_policy import sampled_reverse_kl
from ..sparse_teacher import SparseTeacher
from .capture import capture_forward, lm_head


def shifted_labels(input_ids, attention_mask=None, labels=None, ignore_index=-100):
    """The label each position i < L - 1 is trained against [B, L - 1]: labels (default input_ids) at
    i + 1, ignore_index where the attention mask is 0 at i or at i + 1."""
    labels = input_ids if labels is None else labels
    shifted = labels[:, 1:].clone()
    if attention_mask is not None:
        shifted[(attention_mask[:, :-1] == 0) | (attention_mask[:, 1:] == 0)] = ignore_index
    return shifted


def causal_lm_kd_loss(student_model, input_ids, *, teacher_model=None, teacher=None, attention_mask=None,
                      labels=None, num_items_in_batch=None, ignore_index=-100, reduction="mean", return_metrics=False,
                      **loss_options):
    """KD loss of a causal LM against a teacher model (on any device: its hidden states move to the
    student's), a SparseTeacher ([B, L, k], aligned to the student's positions, e.g. cache[a:b] of a
    fastkd.cache.TeacherCache), or a callable from input_ids to such a SparseTeacher, from the
    hidden states and the LM head: input_ids [B, L] -> the loss (see the module docstring for the
    conventions). loss_options: those of fastkd.fused_linear_kd_loss (temperature, divergence,
    beta, tail, hard_weight, scale_by_t2, vocab_size, chunk_size, backend). return_metrics: also
    return the fastkd.KDMetrics of the kept positions (KD / CE split, top-1 agreement, entropy)."""
    if (teacher_model is None) == (teacher is None):
        raise ValueError("give exactly one of teacher_model= (a causal LM) or teacher= (a SparseTeacher)")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got {tuple(input_ids.shape)}")
    shifted = shifted_labels(input_ids, attention_mask, labels, ignore_index)
    lm_head(student_model)  # (its checks: a Linear head, no adapter on it)
    seen = capture_forward(student_model, input_ids, attention_mask)
    (hidden, bias), weight, softcap = seen.shifted(), seen.weight, seen.softcap
    options = dict(student_bias=bias, softcap=softcap, labels=shifted, ignore_index=ignore_index,
                   return_metrics=return_metrics, **loss_options)
    if teacher_model is not None:
        _, t_weight, _, _ = lm_head(teacher_model, modules=True)
        t_device = t_weight.device if torch.is_tensor(t_weight) else next(teacher_model.parameters()).device
        with torch.no_grad():
            t_seen = capture_forward(teacher_model, input_ids.to(t_device),
                             None if attention_mask is None else attention_mask.to(t_device))
        t_hidden, t_scale, t_softcap, t_bias = t_seen.hidden, t_seen.scale, t_seen.softcap, None
        if torch.is_tensor(t_weight):  # (as the forward saw it: gathered, if an engine shards it)
            t_weight, t_bias = t_seen.weight, t_seen.bias
        if not torch.is_tensor(t_weight):  # a head module (a quantised teacher's): run on its device, per chunk
            head, t_scale_now = t_weight, t_scale
            t_weight = lambda x: (head(x.to(t_device)) * t_scale_now).to(hidden.device)  # noqa: E731
            t_scale = 1.0
        elif t_device != hidden.device:  # the teacher elsewhere: its hidden states and head come here
            t_hidden, t_weight, t_bias = (None if x is None else x.to(hidden.device) for x in (t_hidden, t_weight,
                                                                                               t_bias))
        if t_softcap != softcap:
            raise ValueError(f"the teacher's final_logit_softcapping ({t_softcap}) differs from the student's "
                             f"({softcap}); fastkd soft-caps both sides alike")
        t_hidden = t_hidden[:, :-1] * t_scale if t_scale != 1.0 else t_hidden[:, :-1]
        t_bias = None if t_bias is None else t_bias.detach() * t_scale
        options.update(teacher_hidden=t_hidden.to(hidden.device) if torch.is_tensor(t_weight) else t_hidden,
                       teacher_weight=t_weight.detach() if torch.is_tensor(t_weight) else t_weight, teacher_bias=t_bias)
    else:
        if callable(teacher) and not isinstance(teacher, SparseTeacher):
            teacher = teacher(input_ids)  # a served teacher, a function over a cache, ...
        if not isinstance(teacher, SparseTeacher):
            raise TypeError(f"teacher must be a fastkd.SparseTeacher or a callable returning one, got "
                            f"{type(teacher).__name__}")
        options["teacher"] = SparseTeacher(teacher.indices[:, :-1], teacher.logprobs[:, :-1],
                                           teacher.tail_logmass[:, :-1], teacher.temperature, teacher.kind)
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError("num_items_in_batch replaces the row count of reduction='mean'; got reduction="
                         f"{reduction!r}")
    loss = fused_linear_kd_loss(hidden, weight, reduction="sum" if num_items_in_batch is not None else reduction,
                                **options)
    loss, metrics = loss if return_metrics else (loss, None)
    # a window with no kept label: 0 with zero gradients, as "mean" is (never 0 / 0)
    if torch.is_tensor(num_items_in_batch):
        loss = loss / num_items_in_batch.clamp_min(1).to(loss.device)
    elif num_items_in_batch is not None:
        loss = loss / max(num_items_in_batch, 1)
    if seen.anchor is not None:
        loss = loss + seen.anchor.to(loss.dtype)
    return (loss, metrics) if return_metrics else loss


def sampled_reverse_kl_loss(student_model, input_ids, teacher_logprobs, *, completion_mask, attention_mask=None,
                            reward_to_go=True, chunk_size=None, backend="auto", num_items_in_batch=None):
    """fastkd.sampled_reverse_kl of a causal LM on sequences it sampled: input_ids [B, L] (prompt and
    the student's completion), teacher_logprobs [B, L] (at position t, log p(x_t | x_<t), from a
    teacher that returns only the log-probs of given tokens; position 0 unused), completion_mask
    [B, L] (True at the sampled tokens). The student's log q(x_t | x_<t) come from its hidden
    states and head through the fused linear path (forward KL against a one-hot teacher at the
    token is -log q: no [B, L, V] logits), then the estimator (its value: the sequences' summed
    log-ratios, mean over B -- or summed and divided by num_items_in_batch, the sequences of the
    whole accumulated batch; its gradient: unbiased for the sequence-level reverse KL)."""
    if input_ids.dim() != 2 or teacher_logprobs.shape != input_ids.shape or completion_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids, teacher_logprobs and completion_mask must all be [B, L], got "
                         f"{tuple(input_ids.shape)}, {tuple(teacher_logprobs.shape)}, {tuple(completion_mask.shape)}")
    lm_head(student_model)
    seen = capture_forward(student_model, input_ids, attention_mask)
    target = input_ids[:, 1:]
    one_hot = SparseTeacher(target.unsqueeze(-1), torch.zeros(target.shape + (1,), device=target.device),
                            torch.full(target.shape, float("-inf"), device=target.device), 1.0, "sampled")
    hidden, bias = seen.shifted()
    neg_logq = fused_linear_kd_loss(hidden, seen.weight, student_bias=bias, softcap=seen.softcap, teacher=one_hot,
                                    tail="renorm_teacher", reduction="none", chunk_size=chunk_size, backend=backend)
    loss = sampled_reverse_kl(-neg_logq, teacher_logprobs[:, 1:].to(neg_logq.dtype), completion_mask[:, 1:],
                              reward_to_go=reward_to_go, reduction="mean" if num_items_in_batch is None else "sum")
    if num_items_in_batch is not None:
        loss = loss / (num_items_in_batch.clamp_min(1).to(loss.device) if torch.is_tensor(num_items_in_batch)
                       else max(num_items_in_batch, 1))
    return loss if seen.anchor is None else loss + seen.anchor.to(loss.dtype)
