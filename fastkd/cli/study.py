"""`python -m fastkd study cache`: quality per byte of the teacher cache, measured.

On the demo's corpus, teacher and student (fastkd/cli/demo.py), students are trained from caches
of several budgets, each the same way and for the same tokens as the demo's students:

- top-k with the bucket tail, k in {8, 16, 32, 64, 128};
- sampled (draws with replacement, unique ids stored with their counts), the draws chosen so that
  the rows hold {4, 8, 12, 16, 32} unique ids on average (fastkd.draws_for_unique, calibrated on
  the first batch of teacher rows);
- and, as the two ends, dense KD (the teacher online, no cache) and hard labels (no teacher).

Each scheme is trained with 3 seeds (the student's initialisation, its data order and the cache's
draws change with the seed; the teacher, trained once to a fixed token budget, does not). The
frontier -- cache bytes per token against validation loss (mean and standard deviation over the
seeds), calibration (ECE) and top-1 agreement with the teacher -- is written as
`<out>/frontier.md` (a table), `<out>/frontier.png` (error bars) and `<out>/frontier.json` (a
list of points: scheme, family, param, bytes_per_token, val_loss_mean, val_loss_std, seeds, ...;
dense KD and hard labels have bytes_per_token null). Results are written only at the end,
atomically. `--quick` is a smoke run of the same path (a smaller corpus and models, fewer schemes
and tokens): its numbers say nothing about quality.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time

import torch

from . import UsageError, check_temperature_flag, demo
from ._publish import publish

HELP = "measure the teacher cache's quality per byte (python -m fastkd study cache)"
REQUIRES = (("tokenizers", "demo"), ("matplotlib", "demo"))  # checked before any work
TOPK = (8, 16, 32, 64, 128)
UNIQUE = (4, 8, 12, 16, 32)
QUICK_TOPK, QUICK_UNIQUE = (8,), (4,)  # (one size of each family: the path, not the frontier)


def add_arguments(p) -> None:
    p.add_argument("what", choices=["cache"], help="what to study: cache (bytes per token against quality)")
    p.add_argument("--out", default="study-out", help="output directory (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a smoke run of the whole path, under 2 minutes")
    p.add_argument("--seeds", type=int, default=None, help="seeds per scheme (default: 3; quick: 2)")
    p.add_argument("--temperature", type=float, default=1.0, help="KD temperature (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")


def _settings(args):
    """The demo's arguments for this study (its corpus, models and student budget)."""
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    quick = ["--quick", "--max-files", "80", "--teacher-tokens", "30720", "--student-tokens", "10240"]
    d = parser.parse_args((quick if args.quick else []) + ["--temperature", str(args.temperature), "--out", args.out]
                          + (["--no-progress"] if args.no_progress else []))
    d.teacher_tokens = d.teacher_tokens or 983_040
    d.student_tokens = d.student_tokens or 400_000
    return d


def write_caches(teacher, tokens, settings, topk, unique, seeds, work, progress=True):
    """One pass of the teacher over `tokens` (whole windows of seq_len, as the demo's students read
    them) writing every cache of the study -> ({scheme: {seed: TeacherCache}}, {unique: draws})."""
    from tqdm import tqdm

    import fastkd
    from ..cache import CacheWriter, TeacherCache

    L, T = settings.seq_len, settings.temperature
    n = tokens.numel() // L * L
    windows = tokens[:n].view(-1, L)
    vocab = teacher.config["vocab"]
    batch = 16
    with torch.no_grad():
        probe = teacher(windows[:batch])  # calibration: the first batch of teacher rows
    draws = {u: fastkd.draws_for_unique(probe, u, T) for u in unique}
    writers, paths = {}, {}
    for k in topk:
        paths[f"topk_bucket-{k}"] = {s: os.path.join(work, f"topk-{k}") for s in seeds}  # (no draws: one cache)
    for u in unique:
        paths[f"sampled-u{u}"] = {s: os.path.join(work, f"sampled-u{u}-seed{s}") for s in seeds}
    for scheme, by_seed in paths.items():
        for s, path in by_seed.items():
            if path in writers:
                continue
            shutil.rmtree(path, ignore_errors=True)
            kw = dict(kind="topk", k=int(scheme.split("-")[1])) if scheme.startswith("topk") else \
                dict(kind="sampled", num_samples=draws[int(scheme.split("-u")[1])])
            writers[path] = (CacheWriter(path, vocab_size=vocab, temperature=T, teacher="study-teacher", seq_len=L,
                                         shard_tokens=16384, **kw), s)
    bar = tqdm(total=n, desc="caches", unit="tok", unit_scale=True, disable=not progress, file=sys.stderr, leave=False)
    with torch.no_grad():
        for a in range(0, windows.shape[0], batch):
            ids = windows[a:a + batch]
            logits = teacher(ids)
            for path, (w, seed) in writers.items():
                m = w.manifest
                if m["kind"] == "topk":
                    rows = fastkd.topk_teacher(logits, k=m["k"], temperature=T)
                else:
                    gen = torch.Generator().manual_seed(seed * 1_000_003 + a)
                    rows = fastkd.sample_teacher(logits, num_samples=m["num_samples"], temperature=T, generator=gen)
                w.append(rows, ids)
            bar.update(ids.numel())
    bar.close()
    for w, _ in writers.values():
        w.close()
    return {scheme: {s: TeacherCache(p) for s, p in by_seed.items()} for scheme, by_seed in paths.items()}, draws


def mean_unique(cache, chunk=16384) -> float:
    """The mean number of stored (unique) ids per row of a sampled cache."""
    total = sum(int(torch.isfinite(cache[a:a + chunk].logprobs).sum()) for a in range(0, len(cache), chunk))
    return total / max(len(cache), 1)


def _stats(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run(args) -> int:
    return demo.interruptible(_run, args)


def _run(args) -> int:
    seeds_n = (2 if args.quick else 3) if args.seeds is None else args.seeds
    if seeds_n < 1:
        raise UsageError(f"--seeds must be at least 1, got {seeds_n}")
    check_temperature_flag(args.temperature)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a file; give a directory (created if missing)")
    d = _settings(args)
    topk, unique = (QUICK_TOPK, QUICK_UNIQUE) if args.quick else (TOPK, UNIQUE)
    seeds = list(range(seeds_n))
    began = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, "work")
    os.makedirs(work, exist_ok=True)
    torch.manual_seed(0)

    train_files, val_files = demo.corpus(0, d.max_files)
    tok = demo.train_tokenizer(train_files, d.vocab)
    vocab = tok.get_vocab_size()
    train, val = demo.encode(tok, train_files), demo.encode(tok, val_files)
    big = dict(vocab=vocab, d=128 if args.quick else 192, layers=2 if args.quick else 3, heads=4, seq_len=d.seq_len)
    small = dict(vocab=vocab, d=64 if args.quick else 96, layers=1 if args.quick else 2, heads=4, seq_len=d.seq_len)
    teacher = demo.TinyLM(**big)
    seen, took, _ = demo.train_teacher(teacher, train, val, d, d.teacher_tokens, math.inf)  # a fixed token budget
    teacher.eval().requires_grad_(False)
    t_ce, t_ece, _ = demo.evaluate(teacher, val, d.seq_len)
    print(f"teacher: d={big['d']}, {big['layers']} layers; {seen:,} tokens in {took:.0f} s; validation loss "
          f"{t_ce:.3f}; V = {vocab}", file=sys.stderr)

    cached = train[:min(train.numel(), d.student_tokens + 8 * d.seq_len)]
    t0 = time.perf_counter()
    caches, draws = write_caches(teacher, cached, d, topk, unique, seeds, work, not args.no_progress)
    print(f"caches: {len(caches)} schemes over {len(cached):,} tokens in {time.perf_counter() - t0:.0f} s; draws per "
          f"unique-id budget {draws}", file=sys.stderr)

    schemes = [("hard_labels", None), ("dense_kd", None)] + [(s, c) for s, c in caches.items()]
    runs = {}
    for seed in seeds:
        torch.manual_seed(1000 + seed)
        init_model = demo.TinyLM(**small)
        init = {"config": init_model.config, "weights": init_model.state_dict()}
        d.seed = seed
        for scheme, by_seed in schemes:
            method = scheme if by_seed is None else ("topk_bucket" if scheme.startswith("topk") else "sampled_kd")
            store = {} if by_seed is None else {"topk" if method == "topk_bucket" else "sampled": by_seed[seed]}
            r = demo.train_student(method, init, cached, val, teacher, store, d, d.student_tokens, curve_points=0)
            runs.setdefault(scheme, []).append(r)
            print(f"  seed {seed} {scheme:16s} val loss {r['val_loss']:.3f}", file=sys.stderr)

    points = []
    for scheme, by_seed in schemes:
        rs = runs[scheme]
        loss_m, loss_s = _stats([r["val_loss"] for r in rs])
        ece_m, ece_s = _stats([r["ece"] for r in rs])
        agree_m, agree_s = _stats([r["top1_agreement"] for r in rs])
        point = {"scheme": scheme, "family": scheme.split("-")[0], "param": None, "bytes_per_token": None,
                 "val_loss_mean": loss_m, "val_loss_std": loss_s, "ece_mean": ece_m, "ece_std": ece_s,
                 "top1_agreement_mean": agree_m, "top1_agreement_std": agree_s, "seeds": seeds,
                 "val_loss_per_seed": [r["val_loss"] for r in rs],
                 "tokens_per_s_mean": _stats([r["tokens_per_s"] for r in rs])[0]}
        if by_seed is not None:
            point["bytes_per_token"] = statistics.fmean(c.bytes_per_token for c in by_seed.values())
            if scheme.startswith("topk"):
                point["param"] = int(scheme.split("-")[1])
            else:
                u = int(scheme.split("-u")[1])
                point.update(param=u, draws=draws[u],
                             unique_mean=statistics.fmean(mean_unique(c) for c in by_seed.values()))
        points.append(point)
    paired_gaps(points)
    report = {"points": points, "teacher_val_loss": t_ce, "teacher_tokens": seen, "vocab_size": vocab,
              "student_tokens": d.student_tokens, "temperature": d.temperature, "quick": args.quick,
              "teacher": big, "student": small, "wall_seconds": time.perf_counter() - began}
    text = table(report)
    publish(args.out, {"frontier.json": json.dumps(points, indent=1).encode(),
                       "study.json": json.dumps(report, indent=1).encode(), "frontier.md": (text + "\n").encode(),
                       "frontier.png": lambda path: plot(report, path)})
    print(text)
    return 0


def paired_gaps(points) -> None:
    """Add each point's gap to dense KD in percent, seed by seed (the same initialisation and data
    order on both sides, so the seed's own luck cancels): gap_to_dense_pct_mean and _std."""
    dense = next(p for p in points if p["scheme"] == "dense_kd")["val_loss_per_seed"]
    for p in points:
        gaps = [(a / b - 1) * 100 for a, b in zip(p["val_loss_per_seed"], dense)]
        p["gap_to_dense_pct_mean"], p["gap_to_dense_pct_std"] = _stats(gaps)


def table(report) -> str:
    """The frontier as a markdown table, sorted by bytes per token (dense KD and hard labels last)."""
    pts = report["points"]
    n = len(pts[0]["seeds"])
    lines = [f"V = {report['vocab_size']}, T = {report['temperature']}; {report['student_tokens']:,} training "
             f"tokens per student; {n} seed{'s' if n > 1 else ''} per scheme (mean ± std); teacher validation loss "
             f"{report['teacher_val_loss']:.3f}; wall time {report['wall_seconds'] / 60:.1f} min", "",
             "| scheme | bytes/token | unique ids | val loss | vs dense KD, paired by seed | ECE | top-1 agree |",
             "|---|---|---|---|---|---|---|"]
    order = sorted(pts, key=lambda p: (p["bytes_per_token"] is None, p["bytes_per_token"] or 0, p["scheme"]))
    for p in order:
        size = "-" if p["bytes_per_token"] is None else f"{p['bytes_per_token']:.1f}"
        uniq = f"{p['unique_mean']:.1f} ({p['draws']} draws)" if "unique_mean" in p else \
            (str(p["param"]) if p["param"] else "-")
        gap = "-" if p["scheme"] == "dense_kd" else \
            f"{p['gap_to_dense_pct_mean']:+.1f}% ± {p['gap_to_dense_pct_std']:.1f}%"
        lines.append(f"| {p['scheme']} | {size} | {uniq} | {p['val_loss_mean']:.3f} ± {p['val_loss_std']:.3f} | "
                     f"{gap} | {p['ece_mean']:.3f} | {p['top1_agreement_mean']:.3f} |")
    return "\n".join(lines)


def plot(report, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = report["points"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for family, marker in (("topk_bucket", "o"), ("sampled", "s")):
        fam = sorted((p for p in pts if p["family"] == family), key=lambda p: p["bytes_per_token"])
        if fam:
            ax.errorbar([p["bytes_per_token"] for p in fam], [p["val_loss_mean"] for p in fam],
                        yerr=[p["val_loss_std"] for p in fam], marker=marker, capsize=3, label=family)
            for p in fam:
                ax.annotate(str(p["param"]), (p["bytes_per_token"], p["val_loss_mean"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
    for name, style in (("dense_kd", "-"), ("hard_labels", ":")):
        p = next(q for q in pts if q["scheme"] == name)
        ax.axhline(p["val_loss_mean"], color="k", linestyle=style, linewidth=1, label=f"{name} (no cache)")
        ax.axhspan(p["val_loss_mean"] - p["val_loss_std"], p["val_loss_mean"] + p["val_loss_std"], color="k",
                   alpha=0.08)
    ax.set_xscale("log")
    ax.set_xlabel("cache bytes per token (log scale)")
    ax.set_ylabel("student validation loss (nats / token)")
    ax.set_title("fastkd teacher cache: quality per byte (mean ± std over seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
