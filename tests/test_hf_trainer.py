"""fastkd.hf.DistillationTrainer's hostile cases, in one process: gradient accumulation weights the
micro-batches by their kept tokens (on-policy rows carry no labels column, so the Trainer counted
none), the generation stops at the model's EOS, an on-policy run resumes to what the uninterrupted
run does, the sampling settings are plain sampling unless asked otherwise, and bad options fail at
construction, naming themselves. (Under torchrun: tests/test_hf_ddp.py, tests/test_hf_on_policy.py.)"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastkd.hf  # noqa: E402
from test_hf_on_policy import EOS, PAD, PromptCompletion, _generation, _model  # noqa: E402


class InOrder(fastkd.hf.DistillationTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=0.1, optim="sgd",
                lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                disable_tqdm=True, seed=0)
    return transformers.TrainingArguments(**{**base, **kw})


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_accumulation_weights_micro_batches_by_their_tokens(tmp_path):
    """Completions of 1 and 6 tokens: batch 1 x 2 accumulation steps trains as batch 2 x 1 (the
    micro-batch means were averaged: 85% off), with the data's completions and with the student's."""
    rows = [{"prompt_input_ids": [5, 6, 7], "completion_input_ids": [9]},
            {"prompt_input_ids": [8, 9], "completion_input_ids": [10, 11, 12, 13, 14, 15]}] * 2  # (a list is a Dataset)
    for on_policy in (0.0, 1.0):
        got = {}
        for batch, accum in ((2, 1), (1, 2)):
            student, teacher = _model(0), _model(1, hidden=48)
            start = _params(student)
            InOrder(model=student, teacher_model=teacher, train_dataset=rows, on_policy=on_policy,
                    generation_config=_generation(),
                    args=_args(tmp_path / f"{batch}", per_device_train_batch_size=batch,
                               gradient_accumulation_steps=accum)).train()
            got[batch] = _params(student)
        assert max((got[2][k] - start[k]).abs().max() for k in start) > 1e-3
        if on_policy == 0:  # (sampled completions differ with the batch's shape: only the data's are compared)
            for k in start:
                torch.testing.assert_close(got[1][k], got[2][k], rtol=1e-5, atol=1e-7, msg=k)


def test_generation_stops_at_the_models_eos(monkeypatch):
    """A GenerationConfig that names no EOS: generate() stops at the model's, and so does the mask."""
    student = _model(0)
    prompt = torch.tensor([[4, 5, 6]])

    def generate(self, input_ids, attention_mask, generation_config):
        assert generation_config.eos_token_id is None
        return torch.cat([input_ids, torch.tensor([[7, EOS, PAD, PAD]])], 1)

    monkeypatch.setattr(type(student), "generate", generate)
    config = transformers.GenerationConfig(max_new_tokens=4, do_sample=True, pad_token_id=PAD)
    ids, mask = fastkd.hf.generate_completions(student, prompt, torch.ones_like(prompt), config)
    assert ids.tolist() == [[7, EOS, PAD, PAD]] and mask.tolist() == [[1, 1, 0, 0]]


def test_on_policy_resume_equals_the_uninterrupted_run(tmp_path):
    """on_policy=0.5: which batches are sampled, and what is sampled, depend on the step alone -- a run
    resumed from its checkpoint logs and ends as the run that never stopped."""
    def trainer(out, **kw):
        return InOrder(model=_model(0), teacher_model=_model(1, hidden=48), train_dataset=PromptCompletion(n=24),
                       on_policy=0.5, generation_config=_generation(),
                       args=_args(out, max_steps=6, save_strategy="steps", save_steps=3, **kw))

    whole = trainer(tmp_path / "whole")
    whole.train()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    logs = [[(e["loss"], e["on_policy_fraction"]) for e in t.state.log_history if "loss" in e and e["step"] > 3]
            for t in (whole, resumed)]
    assert len(logs[1]) == 3 and 0 < sum(f for _, f in logs[0]) + sum(
        e["on_policy_fraction"] for e in whole.state.log_history if "loss" in e and e["step"] <= 3) < 6
    assert [f for _, f in logs[0]] == [f for _, f in logs[1]]
    assert [v for v, _ in logs[0]] == pytest.approx([v for v, _ in logs[1]], rel=1e-6)
    for k, v in _params(whole.model).items():
        torch.testing.assert_close(_params(resumed.model)[k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_unset_sampling_settings_are_plain_sampling():
    """What a GenerationConfig leaves unset is plain sampling (not the model's greedy or top-k
    generation_config, nor transformers' top_k=50); what the user set stays; pad and EOS are the model's."""
    student = _model(0)
    student.generation_config.do_sample, student.generation_config.top_k = False, 5
    config = fastkd.hf.generation_config_for(transformers.GenerationConfig(max_new_tokens=3), student)
    assert (config.do_sample, config.temperature, config.top_k, config.top_p) == (True, 1.0, 0, 1.0)
    assert (config.pad_token_id, config.eos_token_id, config.max_new_tokens) == (PAD, EOS, 3)
    assert fastkd.hf.biased_settings(config) == []
    mine = fastkd.hf.generation_config_for(transformers.GenerationConfig(max_new_tokens=3, top_k=8), student)
    assert mine.top_k == 8 and fastkd.hf.biased_settings(mine) == ["top_k=8"]


def _token_teacher(input_ids, attention_mask):
    return torch.zeros(input_ids.shape)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(kd_options={"temperature": -1.0}), ValueError, "kd_options: temperature"),
    (dict(kd_options={"divergence": "nope"}), ValueError, "kd_options: unknown divergence"),
    (dict(kd_options={"reduction": "sum"}), ValueError, r"\['reduction'\]"),
    (dict(kd_options={"chunk_size": 0}), ValueError, "chunk_size"),
    (dict(teacher=lambda ids: None, kd_options={"divergence": "jsd"}), ValueError, "sparse teacher"),
    (dict(args_kw={"label_smoothing_factor": 0.1}), ValueError, "label_smoothing_factor"),
    (dict(compute_loss_func=lambda *a, **k: 0), ValueError, "compute_loss_func"),
    (dict(token_teacher=_token_teacher, on_policy=1.0, kd_options={"temperature": 2.0}), ValueError,
     "do not apply with token_teacher"),
    (dict(token_teacher=_token_teacher, on_policy=1.0,
          generation_config=transformers.GenerationConfig(max_new_tokens=3, top_p=0.9)), ValueError, "top_p=0.9"),
    (dict(generation_config={"max_new_tokens": 3}), TypeError, "generation_config"),
])
def test_bad_options_fail_at_construction(tmp_path, kwargs, error, match):
    kwargs = dict(kwargs)
    args = _args(tmp_path, **kwargs.pop("args_kw", {}))
    if not any(k in kwargs for k in ("teacher", "token_teacher")):
        kwargs["teacher_model"] = _model(1)
    with pytest.raises(error, match=match):
        fastkd.hf.DistillationTrainer(model=_model(0), args=args, train_dataset=PromptCompletion(), **kwargs)


def test_empty_prompts_and_mixed_rows_are_named(tmp_path):
    """An empty prompt with on_policy=1 (IndexError from inside generate()); a batch where only some rows
    have completions (a bare KeyError, or in the other order the completions silently dropped)."""
    empty = [{"prompt_input_ids": [4, 5]}, {"prompt_input_ids": []}]
    trainer = InOrder(model=_model(0), teacher_model=_model(1), train_dataset=empty, on_policy=1.0,
                      generation_config=_generation(), args=_args(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match=r"rows \[1\] of the batch have an empty prompt"):
        trainer.train()
    collate = fastkd.hf.PromptCompletionCollator(PAD)
    some = [{"prompt_input_ids": [4], "completion_input_ids": [5]}, {"prompt_input_ids": [6]}]
    for rows in (some, some[::-1]):
        with pytest.raises(ValueError, match="no 'completion_input_ids'"):
            collate(rows)
