"""fastkd.hf.DistillationTrainer: a transformers.Trainer whose loss is fastkd's (losses.py), with
on-policy generation in get_batch_samples (data.py) and the loss normalised over every process."""
import math
import random
import time

import torch

import transformers

from .._fused_loop import check_chunk_size
from .._metrics import NAMES as _METRIC_NAMES, KDMetrics
from .._options import loss_options
from ..sparse_teacher import SparseTeacher
from .data import (PromptCompletionCollator, _has_prompts, _pad_id, biased_settings, generate_completions,
                   generation_config_for, pack_prompt_completion)
from .losses import causal_lm_kd_loss, sampled_reverse_kl_loss, shifted_labels


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
    checked = {k: v for k, v in kd_options.items() if k != "chunk_size"}
    if sparse:
        checked.setdefault("temperature", None)
    try:
        check_chunk_size(kd_options.get("chunk_size"))
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
            count = torch.tensor(sum(b["input_ids"].shape[0] for b in batches), device=device)
        else:  # (summed on the batches' device: no host sync per micro-batch)
            count = sum((shifted_labels(b["input_ids"], b.get("attention_mask"), b.get("labels")) != -100).sum()
                        for b in batches).to(device)
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
