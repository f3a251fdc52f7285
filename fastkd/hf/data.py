"""On-policy data for fastkd.hf: prompt/completion batches (the collator), packing them one
sequence a row with labels on the completion, sampling completions with generate(), and the
sampling policy (plain sampling for what a GenerationConfig leaves unset; docs/hf.md)."""
import copy

import torch

import transformers

from .capture import unwrap


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


def _id_sources(generation_config, model):
    """Where generate() reads its special token ids, first to last: the config, then (as
    transformers does) the model's generation_config, then its config."""
    inner = unwrap(model)
    sources = (generation_config, getattr(inner, "generation_config", None), getattr(inner, "config", None))
    return [s for s in sources if s is not None]


def eos_of(generation_config, model):
    """The EOS id(s) generate() stops at: the first of _id_sources that names one."""
    return next((s.eos_token_id for s in _id_sources(generation_config, model)
                 if getattr(s, "eos_token_id", None) is not None), None)


def _has_prompts(dataset) -> bool:
    try:
        return dataset is not None and len(dataset) > 0 and "prompt_input_ids" in dataset[0]
    except (TypeError, KeyError, IndexError):
        return False


def _pad_id(generation_config, model) -> int:
    """The id completions are padded with: the first pad (else EOS) id of _id_sources, else 0."""
    for source in _id_sources(generation_config, model):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None)
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
        config.eos_token_id = eos_of(None, model)
    return config


def biased_settings(config):
    """The settings of a GenerationConfig under which generate() does not sample from the model's own
    distribution, as 'name=value' strings (empty: plain sampling)."""
    return [f"{name}={getattr(config, name, None)!r}" for name, ok in NEUTRAL.items()
            if getattr(config, name, None) not in ok]
