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

One job a module: capture.py (the head and hidden states from the model's own forward), losses.py
(causal_lm_kd_loss, sampled_reverse_kl_loss), data.py (prompt/completion batches, generation and
its sampling policy), trainer.py (DistillationTrainer).
"""
import transformers  # noqa: F401 -- (the optional extra: a clear ImportError here when it is missing)

from .capture import lm_head, unwrap
from .data import (PromptCompletionCollator, biased_settings, eos_of, generate_completions, generation_config_for,
                   pack_prompt_completion)
from .losses import causal_lm_kd_loss, sampled_reverse_kl_loss, shifted_labels
from .trainer import DistillationTrainer, check_kd_options

__all__ = ["causal_lm_kd_loss", "sampled_reverse_kl_loss", "DistillationTrainer", "PromptCompletionCollator",
           "lm_head", "unwrap", "pack_prompt_completion", "generate_completions", "generation_config_for",
           "biased_settings", "eos_of", "shifted_labels", "check_kd_options"]
