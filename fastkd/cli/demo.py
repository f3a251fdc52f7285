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
import json
import math
import os
import sys
import time

import torch

from . import UsageError, check_temperature_flag
from ._publish import publish

HELP = "distil a small language model end to end on this machine, every method, and report"
REQUIRES = (("tokenizers", "demo"), ("matplotlib", "demo"))  # checked before any work
METHODS = ("hard_labels", "dense_kd", "topk_bucket", "topk_renorm_teacher", "topk_renorm_both", "sampled_kd",
           "on_policy")

# (the model and data, and the training, live beside this module: demo_lm.py, demo_train.py)
from .demo_lm import TinyLM, cache_teacher, corpus, encode, evaluate, train_tokenizer  # noqa: E402,F401
from .demo_train import naive_step_time, on_policy_batch, train_student, train_teacher, write_cache  # noqa: E402,F401


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
    check_temperature_flag(args.temperature)
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
