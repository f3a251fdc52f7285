"""The demo's training (python -m fastkd demo, docs/demo.md): the teacher to a token or time
budget, its caches, and each method's student -- off-policy from the teacher or its caches, or
on-policy from its own samples -- with the step time of the naive loss beside fastkd's."""
import argparse
import math
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F

from .demo_lm import TinyLM, batches, evaluate


def _bar(total, desc, disable):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=disable, file=sys.stderr, leave=False)


def train_teacher(model, train, val, args, tokens, guard_seconds):
    """Cross-entropy training for `tokens` tokens (rounds of 20 steps; fewer when the validation loss
    stops improving), or until `guard_seconds` pass -> (tokens seen, seconds, cut short by the guard)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    stream = batches(train, args.seq_len, args.batch_size, args.seed + 1)
    best, best_state, since, seen, t0 = math.inf, None, 0, 0, time.perf_counter()
    cut = False
    bar = _bar(tokens, "teacher", args.no_progress)
    while seen < tokens:
        if time.perf_counter() - t0 > guard_seconds:
            cut = True
            break
        for _ in range(20):
            b = next(stream)
            loss = F.cross_entropy(model(b[:, :-1]).reshape(-1, model.config["vocab"]), b[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += b[:, :-1].numel()
            bar.update(b[:, :-1].numel())
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{seen / (time.perf_counter() - t0):.0f}")
        val_loss = evaluate(model, val, args.seq_len, max_windows=16)[0]
        if val_loss < best - 1e-3:
            best, since = val_loss, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if since >= 3:  # no improvement in 3 evaluations: stop
                break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return seen, time.perf_counter() - t0, cut


def write_cache(args, work, train_tokens, kind):
    """Step 4 through the CLI: python -m fastkd cache over the training tokens."""
    from . import cache as cache_cli

    import numpy as np

    np.save(os.path.join(work, "train_ids.npy"), train_tokens.numpy())
    out = os.path.join(work, f"cache-{kind}")
    shutil.rmtree(out, ignore_errors=True)  # an earlier run's (another --seed or corpus): the demo's own scratch
    opts = ["--k", "64"] if kind == "topk" else ["--num-samples", "12"]
    parser = argparse.ArgumentParser()
    cache_cli.add_arguments(parser)
    cache_args = parser.parse_args(["--teacher", "fastkd.cli.demo_lm:cache_teacher", "--input",
                                    os.path.join(work, "train_ids.npy"), "--output", out, *opts,
                                    "--temperature", str(args.temperature), "--seq-len", str(args.seq_len),
                                    "--batch-size", "16", "--shard-tokens", "65536", "--seed", str(args.seed)]
                                   + (["--no-progress"] if args.no_progress else []))
    cache_cli.run(cache_args)
    from ..cache import TeacherCache

    return TeacherCache(out)


@torch.no_grad()
def sample_completions(model, prompts, new_tokens, generator):
    """prompts [B, P] -> [B, new_tokens] sampled from the model at temperature 1, a token at a time."""
    model.eval()
    ids = prompts
    for _ in range(new_tokens):
        last = model.hidden(ids[:, -model.config["seq_len"]:])[:, -1]  # (the head on the last position only)
        probs = torch.softmax(model.head(last).float(), -1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], 1)
    model.train()
    return ids[:, prompts.shape[1]:]


def on_policy_batch(model, b, generator, timing):
    """The on_policy row's batch: the first half of each window is the prompt, the rest the
    student's own sample; labels only on the sampled tokens (-100 at the prompt)."""
    half = b.shape[1] // 2
    t0 = time.perf_counter()
    seq = torch.cat([b[:, :half], sample_completions(model, b[:, :half], b.shape[1] - half, generator)], 1)
    timing["generation_s"] += time.perf_counter() - t0
    labels = seq[:, 1:].clone()
    labels[:, :half - 1] = -100  # (label j is token j + 1: the prompt's tokens are 1 .. half - 1)
    return seq, labels


def student_step(method, model, b, teacher, caches, starts, args, generator=None, timing=None):
    """One training step's loss for `method`: fused linear KD against the teacher (online or cached)."""
    import fastkd

    ids, labels = b[:, :-1], b[:, 1:]
    if method == "on_policy":  # GKD with lambda = 1: the teacher scores the student's own completions
        seq, labels = on_policy_batch(model, b, generator, timing)
        ids = seq[:, :-1]
        h = model.hidden(ids)
        with torch.no_grad():
            th = teacher.hidden(ids)
        return fastkd.fused_linear_kd_loss(h, model.head.weight, teacher_hidden=th, teacher_weight=teacher.head.weight,
                                           temperature=args.temperature, labels=labels)
    h = model.hidden(ids)
    if method == "hard_labels":
        return fastkd.fused_linear_kd_loss(h, model.head.weight, teacher=_one_hot_teacher(labels, args),
                                           tail="renorm_teacher", labels=labels, hard_weight=1.0)
    if method == "dense_kd":
        with torch.no_grad():
            th = teacher.hidden(ids)
        return fastkd.fused_linear_kd_loss(h, model.head.weight, teacher_hidden=th, teacher_weight=teacher.head.weight,
                                           temperature=args.temperature, labels=labels, hard_weight=args.hard_weight)
    cache = caches["sampled" if method == "sampled_kd" else "topk"]
    rows = [cache[s:s + ids.shape[1]] for s in starts]
    sparse = fastkd.SparseTeacher(*(torch.stack([getattr(r, name) for r in rows])
                                    for name in ("indices", "logprobs", "tail_logmass")),
                                  cache.temperature, cache.manifest["kind"])
    tail = {"topk_bucket": "bucket", "topk_renorm_teacher": "renorm_teacher", "topk_renorm_both": "renorm_both",
            "sampled_kd": "renorm_teacher"}[method]
    return fastkd.fused_linear_kd_loss(h, model.head.weight, teacher=sparse, tail=tail, labels=labels,
                                       hard_weight=args.hard_weight)


def _one_hot_teacher(labels, args):
    """hard_labels runs through the same fused loss: hard_weight=1 makes it plain CE (the teacher
    term has weight 0; a one-entry teacher keeps the call's shapes)."""
    import fastkd

    return fastkd.SparseTeacher(labels.unsqueeze(-1), torch.zeros(labels.shape + (1,)),
                                torch.full(labels.shape, float("-inf")), args.temperature, "topk")


def train_student(method, init, train, val, teacher, caches, args, tokens_per_student, curve_points=7):
    """Train one student from `init` by `method` -> its validation figures, speed, peak memory and
    loss curve (`curve_points` evaluations along the way, the last at the end; 0: none)."""
    from . import _memory

    model = TinyLM(**init["config"])
    model.load_state_dict(init["weights"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed + 2)  # the same data order for every method
    windows = (train.numel() - 1) // args.seq_len  # whole cached sequences: the teacher saw the same context
    steps = max(1, tokens_per_student // (args.seq_len * args.batch_size))
    curve, seen, elapsed = [], 0, 0.0
    sampler = torch.Generator().manual_seed(args.seed + 4)  # on_policy's samples
    timing = {"generation_s": 0.0}
    bar = _bar(steps * args.seq_len * args.batch_size, method, args.no_progress)
    peak = 0
    for step in range(steps):
        starts = (torch.randint(0, windows, (args.batch_size,), generator=g) * args.seq_len).tolist()
        b = torch.stack([train[s:s + args.seq_len + 1] for s in starts])
        t0 = time.perf_counter()

        def run():
            loss = student_step(method, model, b, teacher, caches, starts, args, sampler, timing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss

        if step == 1:
            peak = _memory.peak_growth(run) if _memory.cpu_supported() else 0
        else:
            run()
        elapsed += time.perf_counter() - t0
        seen += args.seq_len * args.batch_size
        bar.update(args.seq_len * args.batch_size)
        if curve_points and ((curve_points > 1 and step % max(1,
                                                              steps // (curve_points - 1)) == 0) or step == steps - 1):
            curve.append((seen, evaluate(model, val, args.seq_len)[0]))  # the same windows as the table
    bar.close()
    ce, ece, agree = evaluate(model, val, args.seq_len, teacher)
    out = {"val_loss": ce, "val_ppl": math.exp(ce), "ece": ece, "top1_agreement": agree,
           "tokens_per_s": seen / elapsed, "peak_mem_mb": peak / 2**20, "tokens": seen, "curve": curve}
    if method == "on_policy":
        out.update(generation_s=timing["generation_s"], loss_s=elapsed - timing["generation_s"])
    return out


def naive_step_time(init, teacher, train, args, steps=4):
    """The dense_kd step with the naive loss (materialised logits, log_softmax + kl_div)."""
    model = TinyLM(**init["config"])
    model.load_state_dict(init["weights"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = batches(train, args.seq_len, args.batch_size, args.seed + 2)
    from . import _memory

    times, peak = [], 0
    for i in range(steps):
        b = next(stream)

        def run():
            with torch.no_grad():
                t = teacher(b[:, :-1])
            lq = F.log_softmax(model(b[:, :-1]) / args.temperature, -1)
            loss = F.kl_div(lq.flatten(0, 1), F.log_softmax(t / args.temperature, -1).flatten(0, 1),
                            log_target=True, reduction="batchmean") * args.temperature**2
            opt.zero_grad()
            loss.backward()
            opt.step()

        t0 = time.perf_counter()
        if i == 1 and _memory.cpu_supported():
            peak = _memory.peak_growth(run)
        else:
            run()
        times.append(time.perf_counter() - t0)
    tokens = args.seq_len * args.batch_size
    return {"tokens_per_s": tokens / (sum(times[1:]) / len(times[1:])), "peak_mem_mb": peak / 2**20}
