"""One DistillationTrainer run of a tiny Llama student against a tiny teacher, as tests/test_hf_ddp.py
starts it: under torchrun (DDP, or DeepSpeed ZeRO-3 with ENGINE=zero3; gloo, CPU) or as one
process, on the same global batches. On a GPU: ENGINE=fsdp, the Trainer's own FSDP2 (under
torchrun; accelerate selects FSDP only on GPUs), and ENGINE=cuda, one process on the GPU.

    torchrun --nproc_per_node 2 tests/hf_ddp_case.py OUT OPTIMIZER [ENGINE [VARIANTS]]  (or: python ...)

VARIANTS (comma-separated, default all of VARIANTS below), one Trainer each in the same launch:
"plain" (no labels column), "labels" (a labels column with ignored positions, unevenly over the
ranks: the Trainer counts them across devices), "no_average" (average_tokens_across_devices=False),
"prompts" (prompt/completion rows: the on-policy path with the data's completions).
Writes OUT/result-<rank>.pt: {variant: the logged losses and the student's final parameters}.
"""
import os
import sys

import torch
import transformers

import fastkd.hf

V, STEPS, ACCUM, GLOBAL_MICRO = 64, 4, 2, 8  # GLOBAL_MICRO rows per micro-batch over all ranks


def model(seed, hidden):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=64, num_attention_heads=2,
                                   num_key_value_heads=2, num_hidden_layers=1, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


VARIANTS = ("plain", "labels", "no_average", "prompts")


def prompt_rows(n=STEPS * ACCUM * GLOBAL_MICRO):
    """Prompt/completion rows (prompts 2-6 tokens, completions 1-9: uneven over the ranks), as
    PromptCompletionCollator batches them; the Trainer packs each batch and counts its completion
    tokens in get_batch_samples (on_policy=0: the data's completions, the same in every run)."""
    g = torch.Generator().manual_seed(1)

    def ids(lo, hi):
        return torch.randint(0, V, (int(torch.randint(lo, hi, (), generator=g)),), generator=g).tolist()

    return [{"prompt_input_ids": ids(2, 7), "completion_input_ids": ids(1, 10)} for _ in range(n)]


class Tokens(torch.utils.data.Dataset):
    """Rows of 16 tokens; labels=True adds a labels column with about a third of the positions
    ignored, more in some rows than others (so the ranks' counts differ)."""

    def __init__(self, n=STEPS * ACCUM * GLOBAL_MICRO, length=16, labels=False):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, V, (n, length), generator=g)
        keep = torch.rand(n, length, generator=g) < torch.linspace(0.2, 1.0, n).unsqueeze(1)
        self.labels = torch.where(keep, self.ids, -100) if labels else None

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        row = {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}
        if self.labels is not None:
            row["labels"] = self.labels[i]
        return row


class InOrder(fastkd.hf.DistillationTrainer):
    """The rows in order, on one process and on several: accelerate hands rank r the micro-batches
    r, r + W, ... of size B, so global micro-batch j is rows [j W B, (j + 1) W B) either way."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


# ZeRO-3: every parameter partitioned over the ranks, gathered by DeepSpeed's hooks for each module's
# forward (the LM head's too: fastkd.hf runs in its place, inside those hooks)
ZERO3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
         "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True}


def leave():
    """End a torchrun case once its results are written: every rank meets, the group is closed, and
    the process exits without running C++ destructors -- gloo's threads torn down at interpreter exit
    sometimes abort a finished process ('terminate called without an active exception', SIGABRT)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# The Trainer's own FSDP2: each decoder layer a unit, the root (with the LM head) another. (The string
# form, which transformers 5.17 -- the GPU machines' -- reads; later ones warn that it goes in 5.20.)
FSDP = {"fsdp": "full_shard auto_wrap", "fsdp_config": {"version": 2,
                                                        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}


def main(out, optimizer, engine="ddp", variants=",".join(VARIANTS)):
    results = {variant: run(out, optimizer, engine, variant) for variant in variants.split(",")}
    torch.save(results, os.path.join(out, f"result-{int(os.environ.get('RANK', '0'))}.pt"))
    leave()


def run(out, optimizer, engine, variant):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_gpu = engine in ("fsdp", "cuda")
    student, teacher = model(0, 32), model(1, 48)
    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=GLOBAL_MICRO // world, gradient_accumulation_steps=ACCUM,
        max_steps=STEPS, learning_rate=0.05, optim=optimizer, lr_scheduler_type="constant", weight_decay=0.0,
        logging_steps=1, report_to=[], use_cpu=not on_gpu, ddp_backend="gloo" if world > 1 and not on_gpu else None,
        save_strategy="no", disable_tqdm=True, seed=0, dataloader_drop_last=True,
        average_tokens_across_devices=variant != "no_average",
        deepspeed=ZERO3 if engine == "zero3" and world > 1 else None, **(FSDP if engine == "fsdp" else {}))
    data = prompt_rows() if variant == "prompts" else Tokens(labels=variant == "labels")
    trainer = InOrder(model=student, teacher_model=teacher, args=args, train_dataset=data,
                      kd_options={"temperature": 2.0, "hard_weight": 0.25})
    trainer.train()
    if engine == "zero3" and world > 1:
        assert type(trainer.model_wrapped).__name__ == "DeepSpeedEngine", type(trainer.model_wrapped)
    if engine == "fsdp":  # the Trainer's FSDP2 ran, not DDP in its place
        assert trainer.is_fsdp_enabled and "FSDP" in type(trainer.model_wrapped).__name__, type(trainer.model_wrapped)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    # the KD / CE split, agreement and entropy of each log, summed over both ranks' rows
    split = [[e[k] for k in ("kd_loss", "ce_loss", "top1_agreement", "student_entropy")]
             for e in trainer.state.log_history if "loss" in e]
    params = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
              for k, v in student.state_dict().items()}
    return {"losses": losses, "split": split, "params": params, "world": world}


if __name__ == "__main__":
    main(*sys.argv[1:])
