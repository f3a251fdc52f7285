"""fastkd.hf: knowledge distillation for Hugging Face causal LMs without materialising logits
(the optional extra `pip install 'fastkd[hf]'`; the only module that imports transformers).

    loss = fastkd.hf.causal_lm_kd_loss(student, input_ids, teacher_model=teacher,
                                       attention_mask=mask, temperature=2.0)
    trainer = fastkd.hf.DistillationTrainer(model=student, teacher_model=teacher,
                                            kd_options={"temperature": 2.0}, args=..., train_dataset=...)

The student's own forward runs -- through DDP / FSDP2 / DeepSpeed ZeRO-3 / PEFT wrappers, so their
hooks run -- with its LM head's forward replaced by a capture of the last hidden states and of the
head's weight as the forward sees it (gathered, under ZeRO-3 and FSDP2); the weight (and bias,
and the config's `final_logit_softcapping`) go to fastkd.fused_linear_kd_loss with those, so the
[B, L, V] logits never exist. Conventions, stated because other integrations differ silently:
- Hugging Face's shift: the hidden state at position i is trained against the teacher at
  position i and the label at i + 1. Positions whose shifted label is `ignore_index`, or whose
  attention mask (at i or i + 1) is 0, are ignored. `labels` defaults to `input_ids`.
- No cross-entropy is mixed in unless you ask (`hard_weight=0` by default); the temperature is
  yours (default 1) and T^2 scaling is on (`scale_by_t2=True`), as in fastkd.kd_loss.
- `num_items_in_batch` (what the Trainer passes under gradient accumulation) replaces the kept
  row count of "mean", so accumulated micro-batches sum to the full batch's mean.
- Padded heads over one tokenizer (e.g. 152064 vs 151936 rows): pass `vocab_size`.
- What a model does to its logits after the head -- a scale (Granite's 1 / logits_scaling,
  Cohere's logit_scale, ...) and a soft cap (Gemma's final_logit_softcapping) -- is read from its
  own forward and applied; any other transform is refused with an error that says what it did.
- PEFT students (LoRA, ...) work as they are: the adapters run inside the forward, and only the
  trainable parameters get gradients; an adapter on the LM head itself is refused (merge it, or
  leave the head out of target_modules).
- A sparse teacher's temperature is its own: another `temperature` is refused, as in
  fastkd.sparse_kd_loss; `num_items_in_batch=0` gives 0 with zero gradients.
"""
import copy
import math
import random
import time
from typing import NamedTuple

import torch

import transformers

from ._metrics import NAMES as _METRIC_NAMES, KDMetrics
from ._options import loss_options
from .fused_linear_kd import fused_linear_kd_loss
from .on_policy import sampled_reverse_kl
from .sparse_teacher import SparseTeacher

__all__ = ["causal_lm_kd_loss", "sampled_reverse_kl_loss", "DistillationTrainer", "PromptCompletionCollator",
           "lm_head", "unwrap"]


def unwrap(model):
    """The Hugging Face model inside the wrappers a training engine puts around it: DDP's and
    FSDP1's `.module`, DeepSpeed's engine `.module`, torch.compile's `._orig_mod`, a PEFT model's
    base model (its adapters live inside it, so its forward runs them)."""
    while True:
        inner = getattr(model, "module", None)
        if isinstance(inner, torch.nn.Module):
            model = inner
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        elif callable(getattr(type(model), "get_base_model", None)):  # peft.PeftModel
            model = model.get_base_model()
        else:
            return model


def _active(head):
    """The module a PEFT `modules_to_save` wrapper runs (its trained copy for the active adapter,
    the original with adapters disabled); any other head as it is."""
    copies, original = getattr(head, "modules_to_save", None), getattr(head, "original_module", None)
    if not isinstance(copies, torch.nn.ModuleDict) or not isinstance(original, torch.nn.Module):
        return head
    active = [] if head.disable_adapters else [a for a in head.active_adapters if a in copies]
    return copies[active[0]] if active else original


def lm_head(model, modules=False):
    """(backbone, head weight [V, H], head bias or None, softcap or None) of a causal LM -- or of
    one inside an engine's wrapper -- whose get_output_embeddings() is a Linear (Llama, Qwen2,
    Gemma2, GPT-2 with its tied head, ...). modules=True (a teacher's): a head that is another
    module (a quantised Linear, ...) is returned itself in place of the weight, with no bias."""
    model = unwrap(model)
    head = _active(model.get_output_embeddings())
    if hasattr(head, "base_layer") and hasattr(head, "merge"):  # a PEFT adapter on the head itself
        raise TypeError(f"{type(model).__name__}'s LM head carries a PEFT adapter ({type(head).__name__}): fastkd.hf "
                        "runs the head as one weight inside its fused loss. Leave the head out of the adapter's "
                        "target_modules (train it fully with modules_to_save=['lm_head'], or not at all), or merge "
                        "the adapter first (model.merge_and_unload())")
    if modules and not isinstance(head, torch.nn.Linear) and isinstance(head, torch.nn.Module):
        return model.base_model, head, None, getattr(model.config, "final_logit_softcapping", None)
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{type(model).__name__}.get_output_embeddings() is {type(head).__name__}, not a "
                        "torch.nn.Linear: fastkd.hf needs the LM head's weight")
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return model.base_model, head.weight, head.bias, softcap


# what the stand-in head returns, to read the transform the model applies after it: two small
# values (powers of 2, exact in any float) give its scale, a large one shows any other
# nonlinearity (a soft cap the config does not name: c tanh(8 / c) is 8 (1 - 21 / c^2))
PROBES = (2.0 ** -10, 2.0 ** -9, 8.0)


class _HeadCapture:
    """Runs in place of the LM head's forward during the model's own forward -- the head module
    stays where it is, so the hooks an engine put on it run around this (ZeRO-3 gathers its
    weight, FSDP2 unshards it, DDP sees it used) -- and keeps the head's input (the last hidden
    states) and its weight and bias as they are at that moment (`_as_seen`). It returns, in
    float32 (float64 for a float64 model), three columns of probe values instead of the [B, L, V]
    logits, which are never made. What the model's output holds in their place is its transform
    after the head -- a scale (Granite's 1 / logits_scaling, Cohere's logit_scale, ...), a soft cap
    (Gemma's final_logit_softcapping) -- read off by _head_transform. The output also holds 0 *
    the hidden states and the head's first weight (and bias): the backbone and the head stay in
    the forward's graph, so DDP with find_unused_parameters (the Trainer's default) expects their
    gradients -- which the fused loss gives in backward -- instead of marking them unused, then
    ready twice."""

    def __init__(self, head):
        self.head = head
        self.hidden = self.weight = self.bias = None

    def __call__(self, hidden, *args, **kwargs):
        self.hidden = hidden
        self.weight, self.bias = (_as_seen(getattr(self.head, name, None)) for name in ("weight", "bias"))
        params = [p for p in (self.weight, self.bias) if isinstance(p, torch.Tensor) and p.is_floating_point()]
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # (the scale, read as exactly)
        anchor = (sum((p.reshape(-1)[:1].to(dtype) for p in params), torch.zeros(1, dtype=dtype,
                                                                                device=hidden.device)) * 0
                  ).nan_to_num()
        probes = torch.tensor(PROBES, dtype=dtype, device=hidden.device)
        # (hidden * 0 too: the backbone stays in the graph for DDP as well; nan_to_num keeps a NaN
        # hidden state from hiding the probes)
        return (hidden[..., :1].to(dtype) * 0).nan_to_num() + anchor + probes


def _as_seen(p):
    """A head parameter as the loss, which runs after the model's forward, can use it: a ZeRO-3
    parameter -- gathered for the head's forward and released right after -- as a differentiable
    copy of its gathered value (its gradient reaches the parameter, whose hooks reduce it to the
    partitions); FSDP2's root parameters are gathered for the whole forward and backward, as
    they are. A DTensor (a head that its own fully_shard or a tensor-parallel plan splits) is
    refused."""
    if p is None or not isinstance(p, torch.Tensor):
        return p
    if hasattr(p, "ds_id") and hasattr(p, "ds_numel"):  # deepspeed.runtime.zero: gathered here
        return p.clone()
    if hasattr(p, "device_mesh") and hasattr(p, "placements"):  # a DTensor
        raise TypeError("the LM head's weight is a DTensor outside its forward (the head is an FSDP2 unit of its "
                        f"own, or tensor-parallel: placements {tuple(p.placements)}): fastkd.hf reads the head "
                        "as the model's forward sees it; fully_shard the head together with the root module "
                        "(fully_shard(model) after the layers), as Hugging Face's FSDP2 wrapping does")
    return p


def _softcap_of(config):
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None and hasattr(config, "get_text_config"):
        cap = getattr(config.get_text_config(), "final_logit_softcapping", None)
    return cap


def _logits_of(out):
    """A causal LM's forward output's `logits` (or its first element, for a tuple output)."""
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    return logits


def _head_transform(model, out):
    """(scale, softcap): the model maps its head's output z to softcap * tanh(scale * z / softcap)
    (or scale * z without a cap), read from what it made of the probes; any other transform is
    refused, naming what the model did."""
    logits = _logits_of(out)
    if not torch.is_tensor(logits) or logits.shape[-1] != len(PROBES):
        raise TypeError(f"{type(model).__name__}'s forward does not return its head's output as `logits`: "
                        "fastkd.hf cannot see what it does after the LM head")
    got = logits.detach().reshape(-1, logits.shape[-1])[0].double().tolist()
    cap = _softcap_of(model.config)
    seen = torch.tensor(got[:2], dtype=torch.float64)
    if cap is not None:  # (small values: far from saturation, atanh recovers them)
        seen = cap * torch.atanh((seen / cap).clamp(-1 + 1e-12, 1 - 1e-12))
    scales = seen / torch.tensor(PROBES[:2], dtype=torch.float64)
    scale = float(scales[0])
    big = scale * PROBES[2]
    predicted = big if cap is None else cap * math.tanh(big / cap)
    if not (scale > 0 and abs(float(scales[1]) - scale) <= 1e-4 * scale
            and abs(got[2] - predicted) <= 1e-4 * abs(predicted)):
        raise ValueError(f"{type(model).__name__} transforms its logits after the LM head in a way fastkd does not "
                         f"apply (its output for head values {list(PROBES)} was {got}; fastkd applies a scale and "
                         "the config's final_logit_softcapping); compute its logits and use fastkd.kd_loss")
    return (1.0 if abs(scale - 1) < 1e-6 else scale), cap


def _hidden(model, input_ids, attention_mask):
    """Captured: the last hidden states, the head and its transform from the model's own forward, called
    through whatever wraps it (DDP, FSDP, DeepSpeed, PEFT: their hooks run, so gradients are
    reduced as the engine expects), with the LM head swapped for a capture while it runs."""
    inner = unwrap(model)
    head = inner.get_output_embeddings()
    capture = _HeadCapture(head)
    head.forward = capture  # (an instance attribute: the module's __call__, with its hooks, runs it)
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        del head.forward
    scale, softcap = _head_transform(inner, out)
    logits = _logits_of(out)
    # 0 * the model's output, added to the loss: the engine's hooks on the forward's outputs run in
    # backward (ZeRO-3's on the head's output; without them its gradients never reach the partitions:
    # tests/test_hf_ddp.py), as they would for a loss of the model's logits
    anchor = (logits.sum() * 0).nan_to_num() if logits.requires_grad else None
    return Captured(capture.hidden, capture.weight, capture.bias, scale, softcap, anchor)


class Captured(NamedTuple):
    """What a model's forward with its head swapped out gave: last hidden states [B, L, H], the head's
    weight [V, H] and bias as the forward saw them, its transform after the head, and a zero that
    ties the loss to the forward's output (None under no_grad)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    softcap: float | None
    anchor: torch.Tensor | None

    def shifted(self):
        """(hidden states [B, L - 1, H] of the positions that predict a next token, bias), the head's
        scale folded in: the model's logits are scale * (h W^T + b)."""
        hidden, bias = self.hidden[:, :-1], self.bias
        if self.scale != 1.0:
            hidden, bias = hidden * self.scale, None if bias is None else bias * self.scale
        return hidden, bias


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
    seen = _hidden(student_model, input_ids, attention_mask)
    (hidden, bias), weight, softcap = seen.shifted(), seen.weight, seen.softcap
    options = dict(student_bias=bias, softcap=softcap, labels=shifted, ignore_index=ignore_index,
                   return_metrics=return_metrics, **loss_options)
    if teacher_model is not None:
        _, t_weight, _, _ = lm_head(teacher_model, modules=True)
        t_device = t_weight.device if torch.is_tensor(t_weight) else next(teacher_model.parameters()).device
        with torch.no_grad():
            t_seen = _hidden(teacher_model, input_ids.to(t_device),
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
    seen = _hidden(student_model, input_ids, attention_mask)
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


class PromptCompletionCollator:
    """Batches rows {"prompt_input_ids": ids, "completion_input_ids": ids (optional)} for on-policy
    distillation: prompts left-padded (as generate() takes them), completions right-padded, each
    with its attention mask ("prompt_attention_mask", "completion_attention_mask")."""

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = int(pad_token_id)

    def _pad(self, seqs, left):
        seqs = [torch.as_tensor(x, dtype=torch.long).reshape(-1) for x in seqs]
        width = max((len(x) for x in seqs), default=0)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, x in enumerate(seqs):
            where = slice(width - len(x), width) if left else slice(0, len(x))
            ids[i, where], mask[i, where] = x, 1
        return ids, mask

    def __call__(self, rows):
        if not rows or "prompt_input_ids" not in rows[0]:
            raise ValueError("PromptCompletionCollator takes rows with a 'prompt_input_ids' column")
        out = dict(zip(("prompt_input_ids", "prompt_attention_mask"),
                       self._pad([r["prompt_input_ids"] for r in rows], left=True)))
        having = [i for i, r in enumerate(rows) if "completion_input_ids" in r]
        if having and len(having) != len(rows):
            missing = [i for i in range(len(rows)) if i not in having]
            raise ValueError(f"rows {missing[:8]} of the batch have no 'completion_input_ids' while rows {having[:8]} "
                             "have: give every row a completion, or none (then on_policy=1 samples them)")
        if having:
            out.update(zip(("completion_input_ids", "completion_attention_mask"),
                           self._pad([r["completion_input_ids"] for r in rows], left=False)))
        return out


def pack_prompt_completion(prompt_ids, prompt_mask, completion_ids, completion_mask, pad_token_id,
                           ignore_index=-100):
    """Each row's prompt tokens then its completion tokens, right-padded (so positions count from
    the row's first token, as in one sequence) -> (input_ids, attention_mask, labels [B, L]):
    labels are the completion tokens, ignore_index at the prompt and the padding."""
    rows = []
    for p, pm, c, cm in zip(prompt_ids, prompt_mask, completion_ids, completion_mask):
        prompt, completion = p[pm.bool()], c[cm.bool()]
        rows.append((torch.cat([prompt, completion]), len(prompt)))
    width = max(len(x) for x, _ in rows)
    device = prompt_ids.device
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, ignore_index)
    for i, (x, n_prompt) in enumerate(rows):
        ids[i, :len(x)], mask[i, :len(x)] = x, 1
        labels[i, n_prompt:len(x)] = x[n_prompt:]
    return ids, mask, labels


def generate_completions(model, prompt_ids, prompt_mask, generation_config):
    """Sample completions of left-padded prompts [B, P] from `model` (through its engine wrapper: the
    Hugging Face model inside; in eval mode, under no_grad, with its KV cache) -> (completion ids,
    their mask [B, C]: the new tokens up to and including the first EOS)."""
    empty = (prompt_mask.sum(-1) == 0).nonzero().flatten().tolist() if prompt_ids.shape[1] else \
        list(range(len(prompt_ids)))
    if empty:
        raise ValueError(f"rows {empty[:8]} of the batch have an empty prompt: generate() needs at least one "
                         "prompt token a row (start each prompt with the BOS token)")
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            out = inner.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=generation_config)
    finally:
        inner.train(was_training)
    new = out[:, prompt_ids.shape[1]:]
    eos = eos_of(generation_config, inner)
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    ended = torch.zeros_like(new, dtype=torch.bool)
    if eos:
        hit = torch.isin(new, torch.tensor(eos, device=new.device))
        ended = (hit.long().cumsum(-1) - hit.long()) > 0  # after the first EOS (the EOS itself is kept)
    return new, (~ended).long()


def eos_of(generation_config, model):
    """The EOS id(s) generate() stops at: the config's, else (as transformers does) the model's
    generation_config's, else its config's."""
    for source in (generation_config, getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            return eos
    return None


def _has_prompts(dataset) -> bool:
    try:
        return dataset is not None and len(dataset) > 0 and "prompt_input_ids" in dataset[0]
    except (TypeError, KeyError, IndexError):
        return False


def _pad_id(generation_config, model) -> int:
    for source in (generation_config, getattr(unwrap(model), "generation_config", None), getattr(unwrap(model),
                                                                                                 "config", None)):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    return 0


# Plain sampling from the model's distribution: what an on-policy GenerationConfig leaves unset is
# this, not the model's generation_config (often greedy or top-k/top-p) nor transformers' global
# defaults (top_k=50), which would sample from another distribution than the student's.
SAMPLING = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
# settings under which generate() samples from the model's own distribution (any other value biases
# the sampled-token estimator, whose gradient assumes x ~ q)
NEUTRAL = {"do_sample": (True,), "temperature": (1.0,), "top_k": (None, 0), "top_p": (None, 1.0), "min_p": (None, 0.0),
           "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0),
           "repetition_penalty": (None, 1.0), "num_beams": (None, 1), "no_repeat_ngram_size": (None, 0),
           "bad_words_ids": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
           "min_new_tokens": (None, 0), "min_length": (None, 0)}


def generation_config_for(config, model):
    """The GenerationConfig on-policy completions are sampled with: a copy of `config` (None: 64 new
    tokens) whose unset sampling fields are SAMPLING's, and whose unset pad / EOS ids are the model's."""
    config = copy.deepcopy(config) if config is not None else transformers.GenerationConfig(max_new_tokens=64)
    for name, value in SAMPLING.items():
        if getattr(config, name, None) is None:
            setattr(config, name, value)
    if config.pad_token_id is None:
        config.pad_token_id = _pad_id(None, model)
    if config.eos_token_id is None:
        config.eos_token_id = eos_of(None, unwrap(model))
    return config


def biased_settings(config):
    """The settings of a GenerationConfig under which generate() does not sample from the model's own
    distribution, as 'name=value' strings (empty: plain sampling)."""
    return [f"{name}={getattr(config, name, None)!r}" for name, ok in NEUTRAL.items()
            if getattr(config, name, None) not in ok]


# the loss options a Trainer takes in kd_options (those of fused_linear_kd_loss that are not the batch's)
KD_OPTIONS = ("temperature", "divergence", "beta", "tail", "hard_weight", "scale_by_t2", "vocab_size", "chunk_size",
              "backend")


def check_kd_options(kd_options, sparse):
    """kd_options checked as the loss will check them, at the Trainer's construction: a dict of
    KD_OPTIONS; sparse: the teacher gives SparseTeacher rows (a cache, a callable)."""
    if kd_options is None:
        return {}
    if not isinstance(kd_options, dict):
        raise TypeError(f"kd_options must be a dict of loss options, got {type(kd_options).__name__}")
    unknown = sorted(set(kd_options) - set(KD_OPTIONS))
    if unknown:
        raise ValueError(f"kd_options has {unknown}, which the DistillationTrainer does not take: it sets the batch's "
                         f"labels, ignore_index and reduction itself; the options are {list(KD_OPTIONS)}")
    chunk = kd_options.get("chunk_size")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"kd_options['chunk_size'] must be a positive int or None, got {chunk!r}")
    checked = {k: v for k, v in kd_options.items() if k not in ("chunk_size",)}
    if sparse:
        checked.setdefault("temperature", None)
    try:
        loss_options(**checked, sparse=sparse)
    except (TypeError, ValueError) as e:
        raise type(e)(f"kd_options: {e}") from e
    return dict(kd_options)


class DistillationTrainer(transformers.Trainer):
    """A transformers.Trainer whose loss is fastkd.hf.causal_lm_kd_loss.

    The teacher is one of:
    teacher_model: a causal LM, kept in eval mode, never trained, on `teacher_device` (default: the
        student's) in `teacher_dtype` (default: its own) -- its hidden states move to the student;
    teacher_cache: a fastkd.cache.TeacherCache whose rows come in the batch as "indices",
        "logprobs" and "tail_logmass" (a TeacherCacheDataset's items; pass
        TrainingArguments(remove_unused_columns=False) so the Trainer keeps them);
    teacher: any callable from input_ids [B, L] to a SparseTeacher [B, L, k] (a teacher behind a
        server that returns its top-k, a function over a cache, ...).
    token_teacher: a callable from (input_ids, attention_mask) [B, L] to the teacher's log-probs of
        those tokens [B, L] (log p(x_t | x_<t)): a teacher that returns no rows; the loss is then the
        sampled-token reverse KL on the student's own samples (fastkd.sampled_reverse_kl), so it
        needs on_policy=1.
    kd_options: passed to the loss (temperature, divergence, hard_weight, ...).

    On-policy distillation (GKD, Agarwal et al. 2024): rows {"prompt_input_ids", and optionally
    "completion_input_ids"} (batched by PromptCompletionCollator, the default for such data). For
    each training batch, with probability `on_policy` its completions are sampled from the student
    (`generation_config`, a transformers.GenerationConfig; default: 64 new tokens, sampling at
    temperature 1), else with `seq_kd=True` from the teacher model, else taken from the data; the
    loss covers the completion tokens only (prompt and padding masked), with any divergence of
    kd_options (GKD's generalized JSD is divergence="jsd", beta). Evaluation uses the data's
    completions. Each training log adds on_policy_fraction and generation_seconds / loss_seconds
    per optimizer step (the loss's forward; backward is the Trainer's).

    Besides `loss`, each training log and evaluate() report the fastkd.KDMetrics of the rows seen
    since the last log (summed over micro-batches and processes, measured in the fused pass):
    kd_loss, ce_loss, top1_agreement, student_entropy (eval_kd_loss, ... in evaluate()).
    """

    def __init__(self, *args, teacher_model=None, teacher_cache=None, teacher=None, token_teacher=None,
                 teacher_device=None, teacher_dtype=None, kd_options=None, on_policy=0.0, seq_kd=False,
                 generation_config=None, **kwargs):
        train_data = kwargs.get("train_dataset", args[2] if len(args) > 2 else None)
        if kwargs.get("data_collator") is None and len(args) < 2 and _has_prompts(train_data):
            kwargs["data_collator"] = PromptCompletionCollator(_pad_id(generation_config,
                                                                       kwargs.get("model") or args[0]))
        super().__init__(*args, **kwargs)
        if sum(x is not None for x in (teacher_model, teacher_cache, teacher, token_teacher)) != 1:
            raise ValueError("give exactly one of teacher_model=, teacher_cache=, teacher= (a callable from "
                             "input_ids to a SparseTeacher) or token_teacher= (a callable to token log-probs)")
        if isinstance(on_policy, bool) or not isinstance(on_policy, (int, float)) or not 0 <= on_policy <= 1:
            raise ValueError(f"on_policy must be a probability in [0, 1], got {on_policy!r}")
        if seq_kd and teacher_model is None:
            raise ValueError("seq_kd=True samples the completions from the teacher: it needs teacher_model=")
        if teacher_cache is not None and (on_policy > 0 or seq_kd):
            raise ValueError("a teacher cache holds the teacher's rows of the data's tokens only; on-policy and "
                             "sequence-level KD need a teacher that scores new sequences (teacher_model=, teacher=)")
        if token_teacher is not None and (on_policy != 1 or not callable(token_teacher)):
            raise ValueError("token_teacher= (a callable to the teacher's token log-probs) scores the student's own "
                             "samples with the sampled-token estimator: it needs on_policy=1")
        if token_teacher is not None and kd_options:
            raise ValueError(f"kd_options {sorted(kd_options)} do not apply with token_teacher=: the sampled-token "
                             "reverse KL has no temperature, divergence or hard labels")
        if generation_config is not None and not isinstance(generation_config, transformers.GenerationConfig):
            raise TypeError(f"generation_config must be a transformers.GenerationConfig, got "
                            f"{type(generation_config).__name__}")
        self.on_policy, self.seq_kd, self.token_teacher = float(on_policy), bool(seq_kd), token_teacher
        self.generation_config = generation_config_for(generation_config, self.model)
        biased = biased_settings(self.generation_config)
        if token_teacher is not None and biased:
            raise ValueError(f"generation_config has {', '.join(biased)}: the sampled-token reverse KL "
                             "(token_teacher=) "
                             "needs completions sampled from the student's own distribution (do_sample=True, "
                             "temperature=1, no top-k/top-p or other processors)")
        self._reset_timing()
        if teacher is not None and not callable(teacher):
            raise TypeError(f"teacher must be a callable from input_ids to a fastkd.SparseTeacher, got "
                            f"{type(teacher).__name__}")
        self.kd_options = check_kd_options(kd_options, sparse=teacher_model is None)
        if self.args.label_smoothing_factor:
            raise ValueError(f"label_smoothing_factor={self.args.label_smoothing_factor}: the DistillationTrainer's "
                             "loss is fastkd's, which has no label smoothing (the teacher's soft targets take its "
                             "place; kd_options hard_weight mixes in the plain cross-entropy)")
        if self.compute_loss_func is not None:
            raise ValueError("compute_loss_func: the DistillationTrainer computes its loss with fastkd; subclass it "
                             "and override compute_loss to change the loss")
        if self.args.n_gpu > 1:
            raise ValueError(f"{self.args.n_gpu} GPUs in one process (torch.nn.DataParallel): fastkd.hf captures the "
                             "LM head inside the model's forward, which DataParallel replicates; launch one process "
                             "per GPU (torchrun, accelerate launch) for DDP")
        # the loss divides by num_items_in_batch itself: the Trainer must not also divide by the
        # gradient-accumulation steps (it does for models it thinks take no loss kwargs)
        self.model_accepts_loss_kwargs = True
        self.teacher_cache = teacher_cache
        self.teacher_model = teacher_model
        self.teacher_fn = teacher
        self._kd_metrics = {"train": None, "eval": None}  # KDMetrics summed since the last log
        if teacher_model is not None:
            teacher_model.eval().requires_grad_(False)
            teacher_model.to(device=teacher_device if teacher_device is not None else self.args.device,
                             dtype=teacher_dtype)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the KD loss with the training options, with or without a labels column (the
        Trainer's own step crashed on (loss, None) with labels, and without them ran the model's
        full-logits forward and reported no loss). Returns (loss, None, None): no logits are made."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # the columns fastkd reads besides the model's own (remove_unused_columns would drop them)
    COLUMNS = ("prompt_input_ids", "completion_input_ids", "indices", "logprobs", "tail_logmass")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *self.COLUMNS]))

    def _reset_timing(self):
        """What the next training log reports of on-policy batches, from this optimizer step on."""
        self._timing = {"generation_seconds": 0.0, "loss_seconds": 0.0, "on_policy": 0, "batches": 0,
                        "step": self.state.global_step}

    def _key(self, micro):
        """The seed of micro-batch `micro` of the coming optimizer step: a function of the run's seed and
        the step alone, so every rank draws alike and a resumed run draws what the uninterrupted one did."""
        return (self.args.seed * 1_000_003 + self.state.global_step) * 1_009 + micro

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The coming optimizer step's micro-batches -- a prompt batch packed with its completions,
        generated here when its draw says so -- and the positions the loss keeps over all of them (the
        sequences, with token_teacher=): over every process with average_tokens_across_devices, as
        the Trainer counts a labels column (compute_loss then undoes the engine's mean over ranks)."""
        batches = []
        for micro in range(num_batches):
            try:
                batch = next(epoch_iterator)
            except StopIteration:
                break
            if "prompt_input_ids" in batch:
                ids, mask, labels = self._completions(self.model, batch, key=self._key(micro))
                batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
            batches.append(batch)
        if not batches:
            return batches, None
        if self.token_teacher is not None:
            count = sum(int(b["input_ids"].shape[0]) for b in batches)
        else:
            count = sum(int((shifted_labels(b["input_ids"], b.get("attention_mask"), b.get("labels")) != -100).sum())
                        for b in batches)
        count = torch.tensor(count, dtype=torch.long, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum() // self._replicas()
        return batches, count

    def _replicas(self) -> int:
        """How many processes see each batch (tensor-, context-, sequence-parallel ranks share theirs)."""
        sizes = [getattr(self, name)() for name in ("get_tp_size", "get_cp_size", "get_sp_size") if hasattr(self, name)]
        return math.prod(sizes) if sizes else 1

    def _completions(self, model, inputs, key=None):
        """(input_ids, attention_mask, labels) of a prompt/completion batch: the completions sampled
        from the student (probability on_policy, in training: key is the micro-batch's seed), from the
        teacher (seq_kd), or the data's; packed one sequence a row, labels on the completion tokens only."""
        prompt_ids, prompt_mask = inputs["prompt_input_ids"], inputs["prompt_attention_mask"]
        source = "data"
        if key is not None:
            draw = random.Random(key).random()  # (stateless: the same on every rank, and after a resume)
            source = "student" if draw < self.on_policy else "teacher" if self.seq_kd else "data"
            self._timing["batches"] += 1
            self._timing["on_policy"] += source == "student"
        if source == "data":
            if "completion_input_ids" not in inputs:
                raise ValueError("a batch without completion_input_ids needs completions sampled: on_policy=1 "
                                 "(or seq_kd=True)")
            completion, completion_mask = inputs["completion_input_ids"], inputs["completion_attention_mask"]
        else:
            start = time.perf_counter()
            generator = model if source == "student" else self.teacher_model
            where = self.args.device if source == "student" else self.teacher_model.device
            # the sampling's RNG seeded by the micro-batch (and the rank: ranks sample alike-seeded but
            # different rows), the global RNG left as it was: a resumed run samples the same completions
            with torch.random.fork_rng(devices=[where] if torch.device(where).type == "cuda" else []):
                torch.manual_seed(key * 7919 + self.args.process_index)
                completion, completion_mask = generate_completions(generator, prompt_ids.to(where),
                                                                   prompt_mask.to(where), self.generation_config)
            self._timing["generation_seconds"] += time.perf_counter() - start
            completion, completion_mask = completion.to(prompt_ids.device), completion_mask.to(prompt_ids.device)
        return pack_prompt_completion(prompt_ids, prompt_mask, completion, completion_mask,
                                      self.generation_config.pad_token_id or 0)

    def _across_ranks(self, loss, num_items_in_batch):
        """The loss as the engine's mean over the ranks needs it: num_items_in_batch counted over every
        process (average_tokens_across_devices) makes each rank's loss a part of the global mean,
        which DDP / FSDP / DeepSpeed then divide by the data-parallel world -- so it is multiplied
        back, as transformers.Trainer does for a model's own loss."""
        if num_items_in_batch is None or not self.args.average_tokens_across_devices or self.args.world_size <= 1:
            return loss
        return loss * (self.accelerator.num_processes // self._replicas())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        if "prompt_input_ids" in inputs:  # (evaluation: training batches come packed from get_batch_samples)
            ids, mask, labels = self._completions(model, inputs)
            inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        start = time.perf_counter()
        if self.token_teacher is not None and model.training:
            labels = inputs["labels"]
            teacher_logprobs = self.token_teacher(inputs["input_ids"], inputs["attention_mask"])
            loss = sampled_reverse_kl_loss(model, inputs["input_ids"], teacher_logprobs.to(labels.device),
                                           completion_mask=labels != -100, attention_mask=inputs["attention_mask"],
                                           num_items_in_batch=num_items_in_batch)
            loss = self._across_ranks(loss, num_items_in_batch)
            self._timing["loss_seconds"] += time.perf_counter() - start
            return (loss, None) if return_outputs else loss
        if self.token_teacher is not None:
            raise ValueError("evaluation with token_teacher= has no teacher rows to score the data with; evaluate "
                             "with a DistillationTrainer whose teacher gives rows")
        teacher = self.teacher_fn
        if self.teacher_cache is not None:
            teacher = SparseTeacher(inputs.pop("indices"), inputs.pop("logprobs"), inputs.pop("tail_logmass"),
                                    self.teacher_cache.temperature, self.teacher_cache.manifest["kind"])
        loss, metrics = causal_lm_kd_loss(model, inputs["input_ids"], teacher_model=self.teacher_model,
                                          teacher=teacher, attention_mask=inputs.get("attention_mask"),
                                          labels=inputs.get("labels"), num_items_in_batch=num_items_in_batch,
                                          return_metrics=True, **self.kd_options)
        loss = self._across_ranks(loss, num_items_in_batch)
        mode = "train" if model.training else "eval"
        if model.training:
            self._timing["loss_seconds"] += time.perf_counter() - start
        seen = self._kd_metrics[mode]
        self._kd_metrics[mode] = metrics if seen is None else seen + metrics
        return (loss, None) if return_outputs else loss

    def _kd_means(self, mode):
        """The means of the KDMetrics summed since the last call, over every process (a collective:
        every rank calls it, as every rank calls log() and evaluation_loop()); then reset."""
        seen, self._kd_metrics[mode] = self._kd_metrics[mode], None
        measured = seen.measured if seen is not None else (True,) * len(_METRIC_NAMES)
        local = (torch.zeros(1 + len(_METRIC_NAMES), dtype=torch.float64, device=self.args.device) if seen is None
                 else torch.cat([seen.rows.reshape(1), seen.sums]).to(self.args.device))
        total = self.accelerator.reduce(local, reduction="sum") if self.args.world_size > 1 else local
        return KDMetrics(total[0], total[1:], measured).means()

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:  # a training log: the split of the rows since the last one
            if self.token_teacher is None:
                logs.update(self._kd_means("train"))
            t, steps = self._timing, max(self.state.global_step - self._timing["step"], 1)
            if t["batches"]:
                logs.update(on_policy_fraction=t["on_policy"] / t["batches"],
                            generation_seconds=t["generation_seconds"] / steps, loss_seconds=t["loss_seconds"] / steps)
            self._reset_timing()
        return super().log(logs, *args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        self._kd_metrics["eval"] = None
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        output.metrics.update({f"{prefix}_{name}": v for name, v in self._kd_means("eval").items()})
        return output
