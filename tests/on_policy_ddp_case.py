"""On-policy distillation under torchrun (DDP, gloo, CPU), as tests/test_hf_on_policy.py starts it:
a few steps with on_policy=0.5 over prompt-only and prompt/completion rows. Every rank must make
the same draw each step (else one rank generates while another waits in DDP's all-reduce).

    torchrun --nproc_per_node 2 tests/on_policy_ddp_case.py OUT

Writes OUT/result-<rank>.json: the logged losses and on-policy fractions.
"""
import json
import os
import sys

import torch
import transformers

import fastkd.hf
from hf_ddp_case import leave
from test_hf_on_policy import PromptCompletion, _generation, _model


def main(out):
    rank = int(os.environ.get("RANK", "0"))
    student, teacher = _model(0), _model(1, hidden=48)
    args = transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=6,
                                          learning_rate=0.05,
                                          optim="sgd", logging_steps=1, report_to=[], use_cpu=True,
                                          ddp_backend="gloo", save_strategy="no", disable_tqdm=True, seed=0)
    trainer = fastkd.hf.DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                            train_dataset=PromptCompletion(n=48), on_policy=0.5,
                                            generation_config=_generation())
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    result = {"losses": [e["loss"] for e in logs], "fractions": [e["on_policy_fraction"] for e in logs],
              "wrapped": type(trainer.model_wrapped).__name__}
    with open(os.path.join(out, f"result-{rank}.json"), "w") as f:
        json.dump(result, f)
    assert torch.distributed.is_initialized()
    leave()  # (the Trainer leaves the group it made open)


if __name__ == "__main__":
    main(sys.argv[1])
