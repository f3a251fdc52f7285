"""fastkd.hf on tiny causal LMs built from configs (nothing downloaded): values and gradients
against the materialised path (model(...).logits, HF's shift, fastkd.kd_loss), for Llama, Qwen2,
Gemma2 (soft-capped logits) and GPT-2 (tied head); a sparse teacher; gradient accumulation with
num_items_in_batch; and a 30-step DistillationTrainer run whose KD loss falls."""
import pytest
import torch

transformers = pytest.importorskip("transformers")  # `make test` installs it

import fastkd  # noqa: E402
import fastkd.hf  # noqa: E402

V = 64


def _model(kind, seed, hidden=32):
    torch.manual_seed(seed)
    common = dict(vocab_size=V, num_hidden_layers=1)
    if kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=64, num_attention_heads=2,
                                       num_key_value_heads=2, max_position_embeddings=64, **common)
        return transformers.LlamaForCausalLM(cfg)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=hidden, intermediate_size=64, num_attention_heads=2,
                                       num_key_value_heads=1, max_position_embeddings=64, **common)
        return transformers.Qwen2ForCausalLM(cfg)
    if kind == "gemma2":
        cfg = transformers.Gemma2Config(hidden_size=hidden, intermediate_size=64, num_attention_heads=2,
                                        num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                                        final_logit_softcapping=5.0, **common)
        return transformers.Gemma2ForCausalLM(cfg)
    cfg = transformers.GPT2Config(n_embd=hidden, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0, **common)
    return transformers.GPT2LMHeadModel(cfg)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    return ids, mask


def _materialised(student, teacher, ids, mask, **opts):
    logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = ids[:, 1:].clone()
    labels[(mask[:, :-1] == 0) | (mask[:, 1:] == 0)] = -100
    return fastkd.kd_loss(logits, t.to(logits.dtype), labels=labels, backend="torch", **opts)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2", "gpt2"])
def test_causal_lm_kd_loss_matches_materialised(kind):
    student, teacher = _model(kind, 0).double().eval(), _model(kind, 1).double().eval()  # no dropout
    ids, mask = _batch()
    opts = dict(temperature=2.0, divergence="jsd", hard_weight=0.2)
    loss = fastkd.hf.causal_lm_kd_loss(student, ids, teacher_model=teacher, attention_mask=mask, **opts)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    want = _materialised(student, teacher, ids, mask, **opts)
    want_grads = torch.autograd.grad(want, list(student.parameters()))
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-12)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)


def test_sparse_teacher_and_num_items_in_batch():
    student, teacher = _model("llama", 0).double(), _model("llama", 1).double()
    ids, mask = _batch()
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    sparse = fastkd.topk_teacher(t_logits, k=8, temperature=2.0)
    loss = fastkd.hf.causal_lm_kd_loss(student, ids, teacher=sparse, attention_mask=mask)
    logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = ids[:, 1:].clone()
    labels[(mask[:, :-1] == 0) | (mask[:, 1:] == 0)] = -100
    shifted = fastkd.SparseTeacher(*(f[:, :-1] for f in sparse[:3]), 2.0, "topk")
    torch.testing.assert_close(loss, fastkd.sparse_kd_loss(logits, shifted, labels=labels, backend="torch"))
    # two micro-batches with num_items_in_batch sum to the whole batch's mean
    kept = int((labels != -100).sum())
    parts = [fastkd.hf.causal_lm_kd_loss(student, ids[a:b], teacher_model=teacher, attention_mask=mask[a:b],
                                         num_items_in_batch=kept) for a, b in ((0, 1), (1, 3))]
    whole = fastkd.hf.causal_lm_kd_loss(student, ids, teacher_model=teacher, attention_mask=mask)
    torch.testing.assert_close(sum(parts), whole, rtol=1e-10, atol=1e-12)


def test_bad_input():
    student = _model("llama", 0)
    ids, _ = _batch()
    with pytest.raises(ValueError, match="exactly one"):
        fastkd.hf.causal_lm_kd_loss(student, ids)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        fastkd.hf.causal_lm_kd_loss(_model("gemma2", 0), ids, teacher_model=_model("llama", 1))


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, length=16):
        g = torch.Generator().manual_seed(2)
        # a learnable stream: token i + 1 follows token i mostly
        start = torch.randint(0, V, (n, 1), generator=g)
        self.ids = (start + torch.arange(length)) % V

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


@pytest.mark.slow
def test_distillation_trainer_30_steps_kd_loss_falls(tmp_path):
    student, teacher = _model("llama", 0), _model("llama", 1, hidden=48)
    data = _Tokens()
    # make the teacher good at the stream first (a few plain LM steps)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-2)
    for _ in range(40):
        out = teacher(input_ids=data.ids, labels=data.ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=30,
                                          learning_rate=1e-2, logging_steps=5, report_to=[], use_cpu=True,
                                          gradient_accumulation_steps=2, save_strategy="no",
                                          disable_tqdm=True)
    trainer = fastkd.hf.DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                            kd_options={"temperature": 2.0})
    before = fastkd.hf.causal_lm_kd_loss(student, data.ids, teacher_model=teacher, temperature=2.0).item()
    trainer.train()
    after = fastkd.hf.causal_lm_kd_loss(student, data.ids, teacher_model=teacher, temperature=2.0).item()
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert after < 0.5 * before and logged[-1] < logged[0]
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())


def test_distillation_trainer_from_a_teacher_cache(tmp_path):
    """The same, with the teacher's top-k rows read from a fastkd.cache (no teacher at train time)."""
    from fastkd.cache import CacheWriter, TeacherCache, TeacherCacheDataset

    student, teacher = _model("llama", 0), _model("llama", 1).eval()
    data = _Tokens(n=32)
    with torch.no_grad(), CacheWriter(str(tmp_path / "cache"), vocab_size=V, k=16, temperature=2.0,
                                      teacher="tiny", seq_len=16) as w:
        w.append(fastkd.topk_teacher(teacher(input_ids=data.ids).logits, k=16, temperature=2.0), data.ids)
    cache = TeacherCache(str(tmp_path / "cache"))
    ds = TeacherCacheDataset(cache)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8,
                                          max_steps=12, learning_rate=1e-2, report_to=[], use_cpu=True,
                                          save_strategy="no", disable_tqdm=True, remove_unused_columns=False)
    trainer = fastkd.hf.DistillationTrainer(model=student, teacher_cache=cache, args=args, train_dataset=ds)
    whole = cache[0:len(cache)]
    teacher_rows = fastkd.SparseTeacher(*(f.view(32, 16, -1).squeeze(-1) if f.dim() == 1 else f.view(32, 16, -1)
                                          for f in whole[:3]), 2.0, "topk")
    before = fastkd.hf.causal_lm_kd_loss(student, data.ids, teacher=teacher_rows).item()
    trainer.train()
    after = fastkd.hf.causal_lm_kd_loss(student, data.ids, teacher=teacher_rows).item()
    assert after < 0.7 * before


def test_no_kept_label_in_a_window_is_zero_not_nan():
    """num_items_in_batch=0 (a gradient-accumulation window with no kept label) gave NaN in every
    parameter; fastkd's 'mean' is 0 when no row is kept."""
    student, teacher = _model("llama", 0), _model("llama", 1)
    ids, mask = _batch()
    labels = torch.full_like(ids, -100)
    for n in (0, torch.tensor(0)):
        student.zero_grad()
        loss = fastkd.hf.causal_lm_kd_loss(student, ids, teacher_model=teacher, attention_mask=mask, labels=labels,
                                           num_items_in_batch=n, hard_weight=0.5)
        loss.backward()
        assert loss.item() == 0.0
        assert all(p.grad is None or (p.grad == 0).all() for p in student.parameters())


def test_a_temperature_other_than_the_teachers_is_refused():
    """A SparseTeacher (or cache) made at T = 2, asked to train at T = 4: it trained at T = 2, silently."""
    student, teacher = _model("llama", 0), _model("llama", 1)
    ids, mask = _batch()
    with torch.no_grad():
        sparse = fastkd.topk_teacher(teacher(input_ids=ids).logits, k=8, temperature=2.0)
    with pytest.raises(ValueError, match="differs from the teacher's temperature"):
        fastkd.hf.causal_lm_kd_loss(student, ids, teacher=sparse, attention_mask=mask, temperature=4.0)
    fastkd.hf.causal_lm_kd_loss(student, ids, teacher=sparse, attention_mask=mask, temperature=2.0)  # the same: fine
    fastkd.hf.causal_lm_kd_loss(student, ids, teacher=sparse, attention_mask=mask)  # unsaid: the teacher's


# every causal LM family in transformers that transforms its logits after the head: (config,
# model, the transform's settings); those with grouped-GEMM experts run in fp32, the rest in fp64
FAMILIES = {
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),  # logits * logit_scale
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", {"logit_scale": 0.25}),
    "cohere2_moe": ("Cohere2MoeConfig", "Cohere2MoeForCausalLM", {"logit_scale": 0.25}),
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM", {
        "lm_head_multiplier": 0.5, "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_ssm": 32, "mamba_d_state": 8,
        "mamba_chunk_size": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 5.0}),  # c tanh(z / c)
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"final_logit_softcapping": 5.0}),
    "gemma3n": ("Gemma3nTextConfig", "Gemma3nForCausalLM", {
        "final_logit_softcapping": 5.0, "num_kv_shared_layers": 0, "layer_types": ["full_attention"],
        "vocab_size_per_layer_input": V, "hidden_size_per_layer_input": 8, "laurel_rank": 4,
        "activation_sparsity_pattern": [0.0]}),
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", {
        "final_logit_softcapping": 5.0, "vocab_size_per_layer_input": V, "hidden_size_per_layer_input": 8}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 3.0}),  # logits / logits_scaling
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", {"logits_scaling": 3.0}),
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", {
        "logits_scaling": 3.0, "layer_types": ["attention"], "mamba_n_heads": 4, "mamba_d_head": "auto"}),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM", {"logits_scaling": 3.0}),
    "hyperclovax": ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", {"logits_scaling": 0.5}),  # logits * it
    "nanochat": ("NanoChatConfig", "NanoChatForCausalLM", {"final_logit_softcapping": 5.0}),
    "vaultgemma": ("VaultGemmaConfig", "VaultGemmaForCausalLM", {"final_logit_softcapping": 5.0}),
}
FP32_FAMILIES = {"cohere2_moe", "granitemoe", "granitemoehybrid", "granitemoeshared"}


def _family_model(kind, seed, hidden=32):
    config_name, model_name, transform = FAMILIES[kind]
    config = getattr(transformers, config_name)(
        vocab_size=V, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, **transform)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    return model if kind in FP32_FAMILIES else model.double()


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_a_transform_after_the_head_is_applied(kind):
    """Granite divides its logits by logits_scaling, Cohere multiplies them by logit_scale, Gemma
    soft-caps them, ...: the loss was 0.0124 against 0.00019 (Granite) on the model's own logits,
    silently. Now the transform is read from the model's forward and applied, on both sides: the
    loss and every gradient equal the materialised ones, family by family."""
    student, teacher = _family_model(kind, 0), _family_model(kind, 1, hidden=48)
    ids, mask = _batch()
    opts = dict(temperature=2.0, hard_weight=0.2)
    tol = dict(rtol=1e-4, atol=1e-6) if kind in FP32_FAMILIES else dict(rtol=1e-9, atol=1e-12)
    params = [p for p in student.parameters() if p.requires_grad]
    got = fastkd.hf.causal_lm_kd_loss(student, ids, teacher_model=teacher, attention_mask=mask, **opts)
    want = _materialised(student, teacher, ids, mask, **opts)
    torch.testing.assert_close(got, want, **tol)
    grads = torch.autograd.grad(got, params, allow_unused=True)
    wants = torch.autograd.grad(want, params, allow_unused=True)
    for g, w in zip(grads, wants):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, **tol)


def test_an_unknown_transform_after_the_head_is_refused():
    class Cubed(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits ** 3
            return out

    class Capped(transformers.LlamaForCausalLM):  # a soft cap its config does not name
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = torch.tanh(out.logits / 30.0) * 30.0
            return out

    cfg = _model("llama", 0).config
    ids, mask = _batch()
    for model in (Cubed(cfg), Capped(cfg)):
        with pytest.raises(ValueError, match="transforms its logits after the LM head"):
            fastkd.hf.causal_lm_kd_loss(model, ids, teacher_model=_model("llama", 1), attention_mask=mask)


@pytest.mark.parametrize("head_trained", [False, True])
def test_a_lora_student(head_trained):
    """A LoRA student (peft.get_peft_model): the loss equals the materialised one, and gradients
    reach exactly the trainable (adapter) parameters. It failed with 'student_weight must be [V, H]'
    (PeftModel.base_model is the LoraModel, which returns logits). With modules_to_save=['lm_head']
    (what the refusal of an adapter on the head advises) the head's trained copy is the one used."""
    peft = pytest.importorskip("peft")
    base, teacher = _model("llama", 0), _model("llama", 1)
    student = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                                         init_lora_weights=False,
                                                         modules_to_save=["lm_head"] if head_trained else None))
    if head_trained:  # the copy differs from the original: using the wrong one shows in the loss
        with torch.no_grad():
            fastkd.hf.unwrap(student).get_output_embeddings().modules_to_save["default"].weight.mul_(1.5)
    ids, mask = _batch()
    want = _materialised(student, teacher, ids, mask, temperature=2.0)
    got = fastkd.hf.causal_lm_kd_loss(student, ids, teacher_model=teacher, attention_mask=mask, temperature=2.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    got.backward()
    for name, p in student.named_parameters():
        trained = "lora_" in name or "modules_to_save" in name
        assert (p.grad is not None) == p.requires_grad == trained, name
    lora = [p for n, p in student.named_parameters() if p.requires_grad]
    wants = torch.autograd.grad(_materialised(student, teacher, ids, mask, temperature=2.0), lora)
    for p, w in zip(lora, wants):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-7)


def test_a_lora_on_the_head_is_refused_saying_what_to_do():
    peft = pytest.importorskip("peft")
    student = peft.get_peft_model(_model("llama", 0), peft.LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    ids, mask = _batch()
    with pytest.raises(TypeError, match="target_modules"):
        fastkd.hf.causal_lm_kd_loss(student, ids, teacher_model=_model("llama", 1), attention_mask=mask)


@pytest.mark.parametrize("with_labels", [True, False])
def test_evaluate_reports_the_kd_loss(tmp_path, with_labels):
    """evaluate() on an eval set with a labels column crashed ('NoneType' object is not
    subscriptable); without labels it reported no KD loss. Now eval_loss is the KD loss with the
    training options, either way."""
    student, teacher = _model("llama", 0), _model("llama", 1)
    data = _Tokens(n=8)

    class Labelled(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {**data[i], "labels": data.ids[i]} if with_labels else data[i]

    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[],
                                          use_cpu=True, disable_tqdm=True)
    trainer = fastkd.hf.DistillationTrainer(model=student, teacher_model=teacher, args=args, eval_dataset=Labelled(),
                                            kd_options={"temperature": 2.0, "hard_weight": 0.1})
    metrics = trainer.evaluate()
    want = fastkd.hf.causal_lm_kd_loss(student, data.ids, teacher_model=teacher, temperature=2.0,
                                       hard_weight=0.1).item()
    assert abs(metrics["eval_loss"] - want) < 1e-4 * want
    # the KD / CE split, agreement and entropy, against the materialised logits
    expected = _split(student, teacher, data.ids, temperature=2.0)
    for name, value in expected.items():
        assert metrics[f"eval_{name}"] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert metrics["eval_loss"] == pytest.approx(0.9 * expected["kd_loss"] + 0.1 * expected["ce_loss"], rel=1e-4)


def _split(student, teacher, ids, temperature):
    """kd_loss, ce_loss, top1_agreement, student_entropy over the shifted positions of ids, from
    the models' full logits."""
    with torch.no_grad():
        s = student(input_ids=ids).logits[:, :-1].reshape(-1, V).double()
        t = teacher(input_ids=ids).logits[:, :-1].reshape(-1, V).double()
    labels = ids[:, 1:].reshape(-1)
    p = torch.log_softmax(t / temperature, -1)
    kd = (p.exp() * (p - torch.log_softmax(s / temperature, -1))).sum(-1) * temperature ** 2
    q = torch.log_softmax(s, -1)
    return {"kd_loss": kd.mean().item(), "ce_loss": torch.nn.functional.nll_loss(q, labels).item(),
            "top1_agreement": (s.argmax(-1) == t.argmax(-1)).double().mean().item(),
            "student_entropy": -(q.exp() * q).sum(-1).mean().item()}


def test_training_logs_the_kd_split(tmp_path):
    """Each training log carries the KD / CE split, agreement and entropy of the rows since the
    last log; with the learning rate 0 they are the model's, measured from its full logits."""
    student, teacher = _model("llama", 0), _model("llama", 1)
    data = _Tokens(n=8)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                                          learning_rate=0.0, logging_steps=2, report_to=[], use_cpu=True,
                                          gradient_accumulation_steps=2, save_strategy="no", disable_tqdm=True)
    trainer = fastkd.hf.DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                            kd_options={"temperature": 2.0})
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2
    expected = _split(student.eval(), teacher, data.ids, temperature=2.0)
    for entry in logs:  # each log window saw every row of the set twice (2 steps of 2 x 4 rows)
        for name, value in expected.items():
            assert entry[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
        assert entry["loss"] == pytest.approx(expected["kd_loss"], rel=1e-4)


def test_a_teacher_behind_a_callable(tmp_path):
    """teacher= any callable from input ids to a SparseTeacher (a server returning its top-k, a
    function over a cache): the same loss as the SparseTeacher itself, and a Trainer that learns."""
    student, teacher = _model("llama", 0), _model("llama", 1)
    ids, mask = _batch()
    calls = []

    def served(input_ids):
        calls.append(tuple(input_ids.shape))
        with torch.no_grad():
            return fastkd.topk_teacher(teacher(input_ids=input_ids).logits, k=16, temperature=2.0)

    got = fastkd.hf.causal_lm_kd_loss(student, ids, teacher=served, attention_mask=mask)
    want = fastkd.hf.causal_lm_kd_loss(student, ids, teacher=served(ids), attention_mask=mask)
    torch.testing.assert_close(got, want)
    data = _Tokens(n=32)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=12,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                          disable_tqdm=True)
    trainer = fastkd.hf.DistillationTrainer(model=student, teacher=served, args=args, train_dataset=data)
    before = fastkd.hf.causal_lm_kd_loss(student, data.ids, teacher=served).item()
    trainer.train()
    assert fastkd.hf.causal_lm_kd_loss(student, data.ids, teacher=served).item() < 0.8 * before
    assert (8, 16) in calls


def test_teacher_device_and_dtype(tmp_path):
    """teacher_model= is moved to teacher_device / teacher_dtype (it was always the student's device);
    its hidden states come to the student's."""
    student, teacher = _model("llama", 0), _model("llama", 1)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = fastkd.hf.DistillationTrainer(model=student, teacher_model=teacher, args=args, teacher_device="cpu",
                                            teacher_dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in teacher.parameters())
    ids, mask = _batch()
    got = fastkd.hf.causal_lm_kd_loss(student, ids, teacher_model=teacher, attention_mask=mask)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    with pytest.raises(ValueError, match="exactly one of"):
        fastkd.hf.DistillationTrainer(model=student, teacher_model=teacher, teacher=lambda ids: None, args=args)
    del trainer


class _Int8Head(torch.nn.Module):
    """A quantised LM head (int8 weight, a scale per row), not an nn.Linear: what a bitsandbytes or
    GPTQ teacher's get_output_embeddings() returns."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach()
        self.scale = w.abs().amax(-1, keepdim=True) / 127
        self.q = torch.round(w / self.scale).to(torch.int8)
        self.calls = []

    def dequantized(self):
        return self.q.float() * self.scale

    def forward(self, x):
        self.calls.append(x.shape[0] if x.dim() == 2 else x.shape[:-1].numel())
        return x @ self.dequantized().T


def test_a_teacher_whose_head_is_not_a_linear():
    """A quantised teacher's head could not be used (`not a torch.nn.Linear`); now it runs as
    itself, on a chunk of rows at a time, and gives the loss of the same head dequantised."""
    student, teacher = _model("llama", 0), _model("llama", 1)
    quant = _Int8Head(teacher.lm_head)
    ids, mask = _batch()
    plain = _model("llama", 1)
    plain.lm_head.weight.data.copy_(quant.dequantized())
    want = fastkd.hf.causal_lm_kd_loss(student, ids, teacher_model=plain, attention_mask=mask, temperature=2.0)
    teacher.lm_head = quant
    got = fastkd.hf.causal_lm_kd_loss(student, ids, teacher_model=teacher, attention_mask=mask, temperature=2.0,
                                      chunk_size=10)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    rows = 3 * 11  # [B, L - 1] positions
    assert max(quant.calls[1:]) <= 10 and sum(quant.calls[1:]) == rows  # chunks, never all the rows at once
