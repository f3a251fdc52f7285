"""`python -m fastkd demo`: distil a small language model end to end, with every method fastkd offers.

1. corpus: the Python standard library's own .py files, split into train and validation by file
   (a fixed, seeded split);
2. tokenizer: a byte-level BPE trained on the training split (`tokenizers`);
3. teacher: a small decoder-only transformer (torch.nn) trained with cross-entropy until its
   validation loss stops improving or its time budget ends;
4. cache: the teacher's top-64 and sampled-12 rows over the training tokens, written by
   `python -m fastkd cache` (the path a user takes);
5. students: a smaller transformer, the same initialisation, data order and tokens for every
   method -- hard_labels, dense_kd (teacher online), topk_bucket, topk_renorm_teacher,
   topk_renorm_both, sampled_kd, and on_policy (the student completes the first half of each
   window by sampling, the teacher scores its completion: GKD with lambda = 1) -- each through
   fastkd.fused_linear_kd_loss (no logits);
6. report: validation loss and perplexity, calibration (ECE), agreement with the teacher's top-1,
   tokens/s and peak memory per method, and the same step with the naive log_softmax + kl_div
   loss; demo-out/results.json and demo-out/loss_curves.png. Results are written only at the end,
   atomically: Ctrl-C leaves none half-written.
"""
import argparse
import glob
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F

from . import UsageError
from ._publish import publish

HELP = "distil a small language model end to end on this machine, every method, and report"
REQUIRES = (("tokenizers", "demo"), ("matplotlib", "demo"))  # checked before any work
METHODS = ("hard_labels", "dense_kd", "topk_bucket", "topk_renorm_teacher", "topk_renorm_both", "sampled_kd",
           "on_policy")


def add_arguments(p) -> None:
    p.add_argument("--out", default="demo-out", help="output directory (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a smaller run, under 3 minutes on 2 cores")
    p.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size (default: %(default)s)")
    p.add_argument("--teacher-tokens", type=int, default=None,
                   help="teacher training tokens: the same teacher on every machine (default: 983040; quick: 245760)")
    p.add_argument("--teacher-seconds", type=float, default=None,
                   help="a guard: the teacher's training stops here even if tokens remain, and the demo says so "
                        "loudly (default: 900; quick: 300)")
    p.add_argument("--student-tokens", type=int, default=None,
                   help="training tokens per student (default: 400000; quick: 120000)")
    p.add_argument("--temperature", type=float, default=1.0, help="KD temperature (default: %(default)s)")
    p.add_argument("--hard-weight", type=float, default=0.0, help="CE weight mixed into the KD methods")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--max-files", type=int, default=None, help="use at most this many stdlib files (tests)")
    p.add_argument("--no-progress", action="store_true")


class TinyLM(torch.nn.Module):
    """A pre-norm decoder-only transformer: ids [B, L] -> hidden [B, L, d]; `head` is the LM head."""

    def __init__(self, vocab, d, layers, heads, seq_len):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(seq_len, d)
        layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.config = dict(vocab=vocab, d=d, layers=layers, heads=heads, seq_len=seq_len)

    def hidden(self, ids):
        n = ids.shape[1]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(n, device=ids.device)
        x = self.tok(ids) + self.pos(torch.arange(n, device=ids.device))
        return self.norm(self.blocks(x, mask=mask, is_causal=True))

    def forward(self, ids):
        return self.head(self.hidden(ids))


def corpus(seed, max_files=None):
    """(train files, validation files) of the standard library's .py sources, split 9:1 by file."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                   if "site-packages" not in f and os.sep + "test" not in f[len(root):])
    random.Random(seed).shuffle(files)
    files = files[:max_files] if max_files else files
    n_val = max(1, len(files) // 10)
    return files[n_val:], files[:n_val]


def read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def train_tokenizer(files, vocab):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator((read(f) for f in files), trainer)
    return tok


def encode(tok, files):
    return torch.tensor([i for enc in tok.encode_batch([read(f) for f in files]) for i in enc.ids], dtype=torch.long)


def batches(tokens, seq_len, batch_size, seed):
    """An endless, seeded stream of [B, L + 1] windows (the same order for every student)."""
    g = torch.Generator().manual_seed(seed)
    n = tokens.numel() - seq_len - 1
    while True:
        starts = torch.randint(0, n, (batch_size,), generator=g)
        yield torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model, val, seq_len, teacher=None, max_windows=48):
    """(mean CE in nats, ECE over 15 bins of next-token top-1, agreement with the teacher's top-1)."""
    model.eval()
    n = min(max_windows, (val.numel() - 1) // seq_len)
    windows = val[:n * seq_len + 1]
    ids = windows[:-1].view(n, seq_len)
    target = windows[1:].view(n, seq_len)
    logits = model(ids).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)).item()
    conf, pred = logits.softmax(-1).max(-1)
    correct = (pred == target).float().reshape(-1)
    conf = conf.reshape(-1)
    bins = torch.clamp((conf * 15).long(), max=14)
    ece = sum((bins == b).float().sum() / conf.numel() * (correct[bins == b].mean() - conf[bins == b].mean()).abs()
              for b in range(15) if (bins == b).any()).item()
    agree = float("nan") if teacher is None else (teacher(ids).argmax(-1) == pred).float().mean().item()
    model.train()
    return ce, ece, agree


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


_TEACHER = None


def cache_teacher(ids):
    """The `--teacher fastkd.cli.demo:cache_teacher` callable of step 4: ids [B, L] -> logits."""
    global _TEACHER
    if _TEACHER is None:
        state = torch.load(os.environ["FASTKD_DEMO_TEACHER"], weights_only=True)
        _TEACHER = TinyLM(**state["config"]).eval()
        _TEACHER.load_state_dict(state["weights"])
    with torch.no_grad():
        return _TEACHER(ids)


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
    cache_args = parser.parse_args(["--teacher", "fastkd.cli.demo:cache_teacher", "--input",
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


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, r in results.items():
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title("fastkd demo: students distilled by each method")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def interruptible(main, args) -> int:
    """main(args), and on Ctrl-C a line saying nothing was written to args.out, exit status 130."""
    try:
        return main(args)
    except KeyboardInterrupt:
        print(f"\ninterrupted: no results written to {args.out} (they are written only at the end)", file=sys.stderr)
        return 130


def run(args) -> int:
    return interruptible(_run, args)


def _run(args) -> int:
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(f"--methods: unknown {','.join(unknown) or '(none given)'}; choose from {','.join(METHODS)}")
    for name in ("vocab", "seq_len", "batch_size"):
        if getattr(args, name) < 2:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 2, got {getattr(args, name)}")
    if not 0 < args.temperature < math.inf:
        raise UsageError(f"--temperature must be positive and finite, got {args.temperature}")
    if not 0 <= args.hard_weight <= 1:
        raise UsageError(f"--hard-weight must lie in [0, 1], got {args.hard_weight}")
    if args.device != "cpu":
        raise UsageError("--device: this version of the demo runs on the CPU")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a file; give a directory (created if missing)")
    teacher_tokens = args.teacher_tokens or (245_760 if args.quick else 983_040)
    guard = args.teacher_seconds if args.teacher_seconds is not None else (300.0 if args.quick else 900.0)
    if teacher_tokens < 1 or not guard > 0:
        raise UsageError("--teacher-tokens and --teacher-seconds must be positive")
    per_student = args.student_tokens or (120_000 if args.quick else 400_000)
    torch.manual_seed(args.seed)
    began = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, "work")
    os.makedirs(work, exist_ok=True)

    train_files, val_files = corpus(args.seed, args.max_files or (250 if args.quick else None))
    tok = train_tokenizer(train_files, args.vocab)
    vocab = tok.get_vocab_size()
    train, val = encode(tok, train_files), encode(tok, val_files)
    print(f"corpus: Python {sys.version.split()[0]} standard library, {len(train_files)} train files "
          f"({train.numel():,} tokens), {len(val_files)} validation files ({val.numel():,} tokens); "
          f"byte-level BPE, vocabulary {vocab}")

    big = dict(vocab=vocab, d=128 if args.quick else 192, layers=2 if args.quick else 3, heads=4, seq_len=args.seq_len)
    small = dict(vocab=vocab, d=64 if args.quick else 96, layers=1 if args.quick else 2, heads=4, seq_len=args.seq_len)
    teacher = TinyLM(**big)
    seen, took, cut = train_teacher(teacher, train, val, args, teacher_tokens, guard)
    teacher.eval().requires_grad_(False)
    t_ce, t_ece, _ = evaluate(teacher, val, args.seq_len)
    print(f"teacher: d={big['d']}, {big['layers']} layers, {sum(p.numel() for p in teacher.parameters()):,} "
          f"parameters; {seen:,} tokens in {took:.0f} s; validation loss {t_ce:.3f} (ppl {math.exp(t_ce):.1f})")
    if cut:
        print(f"\nWARNING: the teacher's training was cut short by --teacher-seconds {guard:g}: {seen:,} of "
              f"{teacher_tokens:,} tokens. Every KD number below is against this weaker teacher and will not "
              "match docs/demo.md; on a slower or busy machine, raise --teacher-seconds.\n", file=sys.stderr)

    caches = {}
    cached_tokens = train[:min(train.numel(), per_student + 8 * args.seq_len)]
    os.environ["FASTKD_DEMO_TEACHER"] = os.path.join(work, "teacher.pt")
    torch.save({"config": teacher.config, "weights": teacher.state_dict()}, os.environ["FASTKD_DEMO_TEACHER"])
    for kind in ("topk", "sampled"):
        if any((m == "sampled_kd") == (kind == "sampled") and m.startswith(("topk", "sampled")) for m in methods):
            caches[kind] = write_cache(args, work, cached_tokens, kind)
    cache_info = {kind: {"tokens": len(c), "bytes_per_token": c.bytes_per_token,
                         "bf16_logits_bytes_per_token": 2 * vocab} for kind, c in caches.items()}
    train_for_students = cached_tokens

    torch.manual_seed(args.seed + 3)
    init_model = TinyLM(**small)
    init = {"config": init_model.config, "weights": init_model.state_dict()}
    results = {}
    for method in methods:
        results[method] = train_student(method, init, train_for_students, val, teacher, caches, args, per_student)
        r = results[method]
        print(f"  {method:20s} val loss {r['val_loss']:.3f}  ({r['tokens_per_s']:.0f} tokens/s)", file=sys.stderr)
    naive = naive_step_time(init, teacher, train_for_students, args)
    config = dict(vars(args), vocab_size=vocab, teacher=big, student=small, teacher_val_loss=t_ce,
                  teacher_tokens=seen, teacher_tokens_asked=teacher_tokens, teacher_cut_short=cut,
                  teacher_ece=t_ece, temperature=args.temperature, hard_weight=args.hard_weight,
                  tokens_per_student=per_student, seeds=[args.seed, args.seed + 1, args.seed + 2, args.seed + 3])
    report = {"methods": {k: {key: v for key, v in r.items()} for k, r in results.items()},
              "naive_dense_kd_step": naive, "config": config, "cache": cache_info,
              "wall_seconds": time.perf_counter() - began}
    publish(args.out, {"results.json": json.dumps(report, indent=1, default=str).encode(),
                       "loss_curves.png": lambda path: plot(results, path)})
    print(table(report))
    return 0


def table(report) -> str:
    c = report["config"]
    lines = [f"\nstudents: d={c['student']['d']}, {c['student']['layers']} layers, the same init, data order and "
             f"{c['tokens_per_student']:,} tokens each; T = {c['temperature']}, hard_weight = {c['hard_weight']} "
             f"(hard_labels: CE only); seeds {c['seeds']}",
             f"teacher validation loss {c['teacher_val_loss']:.3f} (ppl {math.exp(c['teacher_val_loss']):.1f}, "
             f"ECE {c['teacher_ece']:.3f})", "",
             "| method | val loss | val ppl | ECE | top-1 agree w/ teacher | tokens/s | peak MB |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report["methods"].items():
        lines.append(f"| {name} | {r['val_loss']:.3f} | {r['val_ppl']:.1f} | {r['ece']:.3f} | "
                     f"{r['top1_agreement']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_mem_mb']:.0f} |")
    n = report["naive_dense_kd_step"]
    lines.append(f"| dense_kd, naive loss (same step) | - | - | - | - | {n['tokens_per_s']:.0f} | "
                 f"{n['peak_mem_mb']:.0f} |")
    if "on_policy" in report["methods"]:
        r = report["methods"]["on_policy"]
        lines.append(f"\non_policy: the first half of each window is the prompt, the student samples the rest (T = 1) "
                     f"and learns the teacher's rows on its samples only; {r['generation_s']:.0f} s generating, "
                     f"{r['loss_s']:.0f} s in the loss and update")
    for kind, info in report["cache"].items():
        lines.append(f"\ncache {kind}: {info['tokens']:,} tokens, {info['bytes_per_token']:.1f} bytes/token "
                     f"(bf16 logits: {info['bf16_logits_bytes_per_token']})")
    lines.append(f"\nwall time {report['wall_seconds']:.0f} s; results.json and loss_curves.png in {c['out']}")
    return "\n".join(lines)
