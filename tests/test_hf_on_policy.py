"""On-policy distillation with fastkd.hf.DistillationTrainer (on_policy=λ, seq_kd, generation_config)
on tiny Llama models built from configs: λ = 0 equals the off-policy Trainer on the concatenation
with the prompt masked; λ = 1 against a copy of the student is loss 0 and leaves it unchanged;
generation runs when λ > 0 (the student's) or seq_kd (the teacher's); prompt and padding positions
carry no loss; the sampled-token estimator through the fused path equals it on full logits."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastkd  # noqa: E402
import fastkd.hf  # noqa: E402

V, PAD, EOS = 64, 0, 1


def _model(seed, hidden=32):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=64, num_attention_heads=2,
                                   num_key_value_heads=2, num_hidden_layers=1, max_position_embeddings=64,
                                   pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2)
    return transformers.LlamaForCausalLM(cfg)


class PromptCompletion(torch.utils.data.Dataset):
    """Rows of a prompt (3-6 tokens) and a completion (2-6 tokens), ids in [2, V)."""

    def __init__(self, n=16, completions=True):
        g = torch.Generator().manual_seed(5)
        self.rows = []
        for _ in range(n):
            p, c = (int(torch.randint(lo, hi, (), generator=g)) for lo, hi in ((3, 7), (2, 7)))
            row = {"prompt_input_ids": torch.randint(2, V, (p,), generator=g).tolist()}
            if completions:
                row["completion_input_ids"] = torch.randint(2, V, (c,), generator=g).tolist()
            self.rows.append(row)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class Concatenated(torch.utils.data.Dataset):
    """The same rows as one sequence each, the prompt masked in the labels (the off-policy form)."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        r = self.data[i]
        ids = torch.tensor(r["prompt_input_ids"] + r["completion_input_ids"])
        labels = ids.clone()
        labels[:len(r["prompt_input_ids"])] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _pad_collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    out = {}
    for key, fill in (("input_ids", PAD), ("attention_mask", 0), ("labels", -100)):
        out[key] = torch.stack([torch.nn.functional.pad(r[key], (0, width - len(r[key])), value=fill) for r in rows])
    return out


def _args(tmp_path, steps=4, **kw):
    return transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps,
                                          learning_rate=0.05, optim="sgd", lr_scheduler_type="constant",
                                          logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                                          disable_tqdm=True, seed=0, **kw)


def _generation(**kw):
    return transformers.GenerationConfig(max_new_tokens=6, do_sample=True, top_k=0, top_p=1.0, pad_token_id=PAD,
                                         eos_token_id=EOS, **kw)


def test_lambda_0_equals_the_off_policy_trainer(tmp_path):
    data = PromptCompletion()
    runs = {}
    for name, dataset, extra in (("prompts", data, {}), ("concatenated", Concatenated(data),
                                                         {"data_collator": _pad_collate})):
        student, teacher = _model(0), _model(1, hidden=48)
        trainer = fastkd.hf.DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path / name),
                                                train_dataset=dataset, on_policy=0.0,
                                                kd_options={"temperature": 2.0}, **extra)
        trainer.train()
        runs[name] = ([e["loss"] for e in trainer.state.log_history if "loss" in e], student.state_dict())
    (losses, params), (want_losses, want_params) = runs["prompts"], runs["concatenated"]
    assert len(losses) == 4
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-5, atol=1e-7)
    for k, v in want_params.items():
        torch.testing.assert_close(params[k], v, rtol=1e-5, atol=1e-7, msg=k)


def test_lambda_1_against_a_copy_of_the_student_is_zero(tmp_path, monkeypatch):
    student = _model(0)
    teacher = copy.deepcopy(student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    calls = []
    generate = type(student).generate

    def counted(self, *args, **kwargs):
        calls.append(self is student)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(type(student), "generate", counted)
    trainer = fastkd.hf.DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, steps=3),
                                            train_dataset=PromptCompletion(completions=False), on_policy=1.0,
                                            generation_config=_generation())
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert calls == [True] * 3  # the student generated each batch
    assert all(e["loss"] < 1e-6 and e["on_policy_fraction"] == 1.0 and e["generation_seconds"] > 0 for e in logs)
    for k, v in before.items():
        torch.testing.assert_close(student.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("on_policy, seq_kd", [(0.5, False), (0.0, True)])
def test_generation_runs_when_asked(tmp_path, monkeypatch, on_policy, seq_kd):
    student, teacher = _model(0), _model(1, hidden=48)
    sources = []
    generate = type(student).generate

    def counted(self, *args, **kwargs):
        sources.append("student" if self is student else "teacher")
        out = generate(self, *args, **kwargs)
        assert out.shape[1] > kwargs["input_ids"].shape[1]
        return out

    monkeypatch.setattr(type(student), "generate", counted)
    trainer = fastkd.hf.DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, steps=8),
                                            train_dataset=PromptCompletion(n=32), on_policy=on_policy, seq_kd=seq_kd,
                                            generation_config=_generation())
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    if seq_kd:
        assert sources == ["teacher"] * 8
    else:  # about half the batches, drawn from the run's seed
        assert 0 < len(sources) < 8 and set(sources) == {"student"}
        assert sum(e["on_policy_fraction"] for e in logs) == len(sources)
    assert all(e["loss"] > 0 and e["loss_seconds"] > 0 for e in logs)


def test_prompt_and_padding_carry_no_loss(tmp_path):
    """The teacher changed at prompt and padding positions only: the loss and every gradient stay."""
    student = _model(0)
    data = PromptCompletion(n=4)
    batch = fastkd.hf.PromptCompletionCollator(PAD)([data[i] for i in range(4)])
    ids, mask, labels = fastkd.hf.pack_prompt_completion(batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                                         batch["completion_input_ids"],
                                                         batch["completion_attention_mask"], PAD)
    assert ((labels == -100) | (mask == 1)).all() and (labels[mask == 0] == -100).all()
    g = torch.Generator().manual_seed(3)
    t_logits = torch.randn(*ids.shape, V, generator=g)
    trained = torch.zeros_like(labels, dtype=torch.bool)
    trained[:, :-1] = labels[:, 1:] != -100  # positions whose next token is a completion token

    def teacher(noise):
        def call(input_ids):
            changed = t_logits + noise * (~trained).unsqueeze(-1) * torch.randn(*ids.shape, V, generator=g)
            return fastkd.topk_teacher(changed, k=8, temperature=1.0)
        return call

    results = []
    for noise in (0.0, 5.0):
        student.zero_grad()
        loss = fastkd.hf.causal_lm_kd_loss(student, ids, teacher=teacher(noise), attention_mask=mask, labels=labels)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_sampled_reverse_kl_loss_through_the_fused_path():
    """The student's token log-probs from the fused path equal those of its logits; the loss is
    fastkd.sampled_reverse_kl of them, with the same gradient."""
    student, teacher = _model(0).double(), _model(1).double()
    ids = torch.randint(2, V, (3, 9), generator=torch.Generator().manual_seed(4))
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, 4:] = True
    with torch.no_grad():
        lp = torch.log_softmax(teacher(input_ids=ids).logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    teacher_logprobs = torch.cat([torch.zeros(3, 1, dtype=lp.dtype), lp], 1)
    got = fastkd.hf.sampled_reverse_kl_loss(student, ids, teacher_logprobs, completion_mask=completion)
    grads = torch.autograd.grad(got, list(student.parameters()))
    lq = torch.log_softmax(student(input_ids=ids).logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    want = fastkd.sampled_reverse_kl(lq, lp, completion[:, 1:])
    wants = torch.autograd.grad(want, list(student.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, wants):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


def test_a_token_teacher_trains_on_policy(tmp_path):
    """token_teacher= (only the log-probs of given tokens): the student's samples are scored with
    the sampled-token estimator; refused without on_policy=1."""
    student, teacher = _model(0), _model(1)

    def token_teacher(input_ids, attention_mask):
        with torch.no_grad():
            logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        lp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        return torch.cat([torch.zeros_like(lp[:, :1]), lp], 1)

    with pytest.raises(ValueError, match="on_policy=1"):
        fastkd.hf.DistillationTrainer(model=student, token_teacher=token_teacher, args=_args(tmp_path),
                                      train_dataset=PromptCompletion(completions=False), on_policy=0.5)
    trainer = fastkd.hf.DistillationTrainer(model=student, token_teacher=token_teacher, args=_args(tmp_path, steps=2),
                                            train_dataset=PromptCompletion(completions=False), on_policy=1.0,
                                            generation_config=_generation())
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(e["loss"] == e["loss"] and e["generation_seconds"] > 0 for e in logs)


def test_bad_on_policy_arguments(tmp_path):
    kw = dict(model=_model(0), args=_args(tmp_path), train_dataset=PromptCompletion())
    with pytest.raises(ValueError, match="on_policy must be a probability"):
        fastkd.hf.DistillationTrainer(teacher_model=_model(1), on_policy=1.5, **kw)
    with pytest.raises(ValueError, match="seq_kd=True"):
        fastkd.hf.DistillationTrainer(teacher=lambda ids: None, seq_kd=True, **kw)


def test_rows_with_empty_completions_carry_no_loss():
    """A completion of no tokens packs to the prompt alone, every label ignored; a batch of such rows
    is loss 0 (reduction 'mean' over no kept row), never NaN."""
    collate = fastkd.hf.PromptCompletionCollator(PAD)
    batch = collate([{"prompt_input_ids": [5, 6, 7], "completion_input_ids": []},
                     {"prompt_input_ids": [8, 9], "completion_input_ids": [10, 11]}])
    assert batch["prompt_input_ids"].tolist() == [[5, 6, 7], [PAD, 8, 9]]
    assert batch["completion_attention_mask"].tolist() == [[0, 0], [1, 1]]
    ids, mask, labels = fastkd.hf.pack_prompt_completion(*(batch[k] for k in (
        "prompt_input_ids", "prompt_attention_mask", "completion_input_ids", "completion_attention_mask")), PAD)
    assert ids.tolist() == [[5, 6, 7, PAD], [8, 9, 10, 11]] and mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert labels.tolist() == [[-100] * 4, [-100, -100, 10, 11]]
    student, teacher = _model(0), _model(1)
    loss = fastkd.hf.causal_lm_kd_loss(student, ids[:1], teacher_model=teacher, attention_mask=mask[:1],
                                       labels=labels[:1])
    assert loss.item() == 0.0


@pytest.mark.slow
def test_on_policy_under_torchrun(tmp_path):
    """2 DDP processes (gloo, a deadline): every rank draws alike, so they generate in the same steps
    and none is left waiting in DDP's all-reduce; the losses are finite and the same on both."""
    import json
    import os
    import pathlib
    import socket
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), str(root / "tests" / "on_policy_ddp_case.py"), str(tmp_path)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    ranks = [json.loads((tmp_path / f"result-{i}.json").read_text()) for i in range(2)]
    assert all(x["wrapped"] == "DistributedDataParallel" for x in ranks)
    assert ranks[0]["fractions"] == ranks[1]["fractions"] and 0 < sum(ranks[0]["fractions"]) < 6
    assert ranks[0]["losses"] == ranks[1]["losses"] and all(v == v and v > 0 for v in ranks[0]["losses"])
