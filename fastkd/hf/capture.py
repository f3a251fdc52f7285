"""Engine-aware capture of a causal LM's last hidden states and LM head: the model's own forward runs
-- through DDP / FSDP2 / DeepSpeed ZeRO-3 / PEFT wrappers, so their hooks run -- with its head's
forward replaced by a capture, and the transform the model applies after the head (a scale, a soft
cap) read back from probe values. The [B, L, V] logits are never made."""
import math
from typing import NamedTuple

import torch


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


def capture_forward(model, input_ids, attention_mask):
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
