"""`python -m fastkd cache`: run a teacher over a token stream and write its sparse rows to a cache.

The teacher is a local Hugging Face causal-LM directory (needs `transformers`; nothing is
downloaded) or a Python callable named as `module:name` or `path/to/file.py:name` that maps
int64 token ids [B, L] to logits [B, L, V]. The input is a `.npy` array of token ids, a text file
of whitespace-separated ids (`--input-format ids`), or plain text tokenised with the teacher
directory's tokenizer (or `--tokenizer DIR`). The stream is cut into sequences of `--seq-len`
tokens (the last may be shorter); cache token i is the teacher's distribution at input position i.
Re-running the same command on the same output directory resumes where a killed run stopped.
"""
import importlib
import importlib.util
import os
import sys
import time

import numpy as np
import torch

from ..cache import CacheError, CacheWriter, TeacherCache
from ..cache.writer import SHARD_TOKENS
from ..sparse_teacher import sample_teacher, topk_teacher
from . import UsageError, check_temperature_flag


HELP = "run a teacher over tokens and write its sparse rows to a cache"


def add_arguments(p) -> None:
    p.add_argument("--teacher", required=True, help="HF causal-LM directory, or module:callable / file.py:callable")
    p.add_argument("--input", required=True, help="token ids (.npy, or text of ids with --input-format ids) or text")
    p.add_argument("--output", required=True, help="cache directory (created, or resumed)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--k", type=int, help="keep the top-k entries of each row")
    what.add_argument("--num-samples", type=int, help="keep num_samples draws of each row (sampled KD)")
    what.add_argument("--unique", type=float, help="sampled KD with the draws that give this many unique ids a "
                                                   "row on average (calibrated on the first batch)")
    what.add_argument("--budget-bytes", type=float, help="the scheme, and its k or draws, that the measured "
                                                         "frontier ranks best within this many bytes per token "
                                                         "(docs/fidelity.md)")
    p.add_argument("--temperature", type=float, required=True, help="temperature of the cached distribution")
    p.add_argument("--input-format", choices=["auto", "npy", "ids", "text"], default="auto",
                   help="auto: .npy is ids, anything else is text (default: %(default)s)")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer directory for text input (default: the teacher's)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per teacher call")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard (at least)")
    p.add_argument("--teacher-name", default=None, help="recorded in the manifest (default: from --teacher)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per batch, so a resumed run draws the same)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")


def _is_hf_dir(spec: str) -> bool:
    return os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "config.json"))


def _load_callable(spec: str):
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--teacher {spec!r}: expected an HF model directory or module:callable / file.py:callable")
    if module_name.endswith(".py"):
        loaded = importlib.util.spec_from_file_location("fastkd_cache_teacher", module_name)
        if loaded is None or not os.path.isfile(module_name):
            raise UsageError(f"--teacher: no such file {module_name!r}")
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UsageError(f"--teacher: {module_name!r} has no callable {attr!r}")
    return fn


def _need_transformers(what: str):
    try:
        import transformers
    except ImportError:
        raise SystemExit(f"{what} needs the optional dependency transformers: pip install 'fastkd[hf]'") from None
    return transformers


def _logits(teacher, ids: torch.Tensor) -> torch.Tensor:
    out = teacher(ids)
    return getattr(out, "logits", out)  # a model output object, or the logits themselves


def load_teacher(spec: str, device: str):
    """-> (callable ids [B, L] -> logits [B, L, V], default name)."""
    if _is_hf_dir(spec):
        transformers = _need_transformers(f"--teacher {spec!r} (a Hugging Face model directory)")
        model = transformers.AutoModelForCausalLM.from_pretrained(spec, local_files_only=True).to(device).eval()

        return (lambda ids: model(input_ids=ids)), os.path.basename(os.path.normpath(spec))
    return _load_callable(spec), spec


def load_tokens(args) -> torch.Tensor:
    fmt = args.input_format
    if fmt == "auto":
        fmt = "npy" if args.input.endswith(".npy") else "text"
    if not os.path.isfile(args.input):
        raise UsageError(f"--input {args.input!r}: no such file")
    if fmt == "npy":
        try:
            ids = np.load(args.input, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise UsageError(f"--input {args.input!r}: not a .npy array of token ids ({e})") from None
    elif fmt == "ids":
        try:
            with open(args.input, encoding="utf-8") as f:
                ids = np.array(f.read().split(), dtype=np.int64)
        except UnicodeDecodeError as e:
            raise UsageError(f"--input {args.input!r}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except (ValueError, OverflowError) as e:
            raise UsageError(f"--input {args.input!r}: not whitespace-separated integer ids ({e})") from None
    else:
        source = args.tokenizer or (args.teacher if _is_hf_dir(args.teacher) else None)
        if source is None:
            raise UsageError("--input is text: give --tokenizer DIR (an HF tokenizer), or token ids "
                             "(.npy, or --input-format ids)")
        transformers = _need_transformers("tokenising text input")
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
        tokenizer.model_max_length = sys.maxsize  # the whole file is one stream, cut into --seq-len later
        try:
            with open(args.input, encoding="utf-8") as f:
                ids = np.array(tokenizer(f.read())["input_ids"], dtype=np.int64)
        except UnicodeDecodeError as e:
            raise UsageError(f"--input {args.input!r}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise UsageError(f"--input: expected a 1-D array of integer token ids, got {ids.dtype} {ids.shape}")
    return torch.from_numpy(ids.astype(np.int64))


def check_device(spec: str) -> torch.device:
    """--device as a torch.device this torch can use (before any work), else a UsageError naming it."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {spec!r} is not a device torch knows ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec!r}: this torch ({torch.__version__}) sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {spec!r}: only {torch.cuda.device_count()} CUDA devices here")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {spec!r}: fastkd's cache runs on cpu or cuda")
    return device


def run(args) -> int:
    for name in ("seq_len", "batch_size", "shard_tokens", "k", "num_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("unique", "budget_bytes"):
        value = getattr(args, name)
        if value is not None and not (value > 0 and value < float("inf")):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if args.num_samples is not None and args.num_samples > 255:
        raise UsageError(f"--num-samples must be at most 255, got {args.num_samples}")
    check_temperature_flag(args.temperature)
    if not 0 <= args.seed < 2 ** 40:
        raise UsageError(f"--seed must lie in [0, 2**40), got {args.seed}")
    check_device(args.device)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UsageError(f"--output {args.output!r} is a file, not a cache directory")
    tokens = load_tokens(args)
    teacher, default_name = load_teacher(args.teacher, args.device)
    if tokens.numel() == 0:
        raise UsageError(f"--input {args.input!r} holds no tokens")
    with torch.no_grad():
        probe = _logits(teacher, tokens[:1].view(1, 1).to(args.device))
    if not isinstance(probe, torch.Tensor) or probe.dim() != 3 or not probe.is_floating_point():
        raise UsageError(f"--teacher must return float logits [B, L, V] for ids [B, L]; got "
                         f"{getattr(probe, 'shape', type(probe).__name__)}")
    vocab = probe.shape[-1]
    if vocab == 0:
        raise UsageError("--teacher returned logits with V = 0 entries per token")
    if args.k is not None and args.k > vocab:
        raise UsageError(f"--k {args.k} exceeds the teacher's vocabulary V = {vocab}")
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise UsageError(f"--input: token ids must lie in [0, {vocab}) (the teacher's vocabulary), "
                         f"got [{int(tokens.min())}, {int(tokens.max())}]")
    if args.unique is not None or args.budget_bytes is not None:
        _size_by_budget(args, tokens, teacher)
    try:
        writer = CacheWriter(args.output, vocab_size=vocab, kind="topk" if args.k else "sampled", k=args.k,
                             num_samples=args.num_samples, temperature=args.temperature,
                             teacher=args.teacher_name or default_name, seq_len=args.seq_len,
                             shard_tokens=args.shard_tokens)
    except (CacheError, ValueError) as e:
        raise UsageError(f"--output {args.output!r}: {e}") from None
    start = writer.num_tokens
    try:
        _check_resume(args, writer, tokens)
    except SystemExit:
        writer.abandon()
        raise
    from tqdm import tqdm

    bar = tqdm(total=tokens.numel(), initial=start, unit="tok", unit_scale=True, disable=args.no_progress,
               desc="fastkd cache", file=sys.stderr)
    began, step = time.perf_counter(), args.seq_len * args.batch_size
    try:
        _fill(args, tokens, teacher, writer, start, step, bar, vocab)
    except KeyboardInterrupt:
        # keep the whole shards written so far, not the partial one buffered: a resumed run then
        # writes the same shards, byte for byte, as an uninterrupted one
        writer.abandon()
        bar.close()
        print(f"\ninterrupted: {args.output} holds {writer.num_tokens} tokens (whole shards); run the "
              "same command to resume", file=sys.stderr)
        return 130
    except (ValueError, CacheError) as e:  # a NaN teacher row, a write that failed: nothing half-written
        writer.abandon()
        bar.close()
        raise SystemExit(f"{args.output}: stopped at token {writer.num_tokens} (whole shards kept): {e}") from None
    writer.close()
    bar.close()
    done = tokens.numel() - start
    took = time.perf_counter() - began
    shards = writer.manifest["shards"]
    size = sum(e["bytes"] for e in shards)
    print(f"{args.output}: {writer.num_tokens} tokens in {len(shards)} shards, {size / max(writer.num_tokens, 1):.1f} "
          f"bytes/token; this run {done} tokens in {took:.1f} s ({done / max(took, 1e-9):.0f} tokens/s)"
          + (f", resumed at token {start}" if start else ""))
    return 0


def _size_by_budget(args, tokens, teacher) -> None:
    """--unique / --budget-bytes: set --k or --num-samples from the teacher's rows on the input's
    first batch (the same on a resumed run, so it continues the same cache)."""
    from ..cache import budget
    from ..sparse_teacher import draws_for_unique, expected_unique

    first = tokens[:args.seq_len * args.batch_size]
    whole = first.numel() // args.seq_len * args.seq_len
    ids = first[:whole].view(-1, args.seq_len) if whole else first.view(1, -1)
    with torch.no_grad():
        probe = _logits(teacher, ids.to(args.device)).float()
    if args.unique is not None:
        args.num_samples = draws_for_unique(probe, args.unique, args.temperature)
        reached = expected_unique(probe, args.num_samples, args.temperature)
        print(f"--unique {args.unique:g}: {args.num_samples} draws a row, {reached:.1f} unique ids on average "
              "on the first batch" + ("" if reached >= args.unique
                                      else " (at most 255 draws: the budget is not reached)"),
              file=sys.stderr)
        return
    try:
        pick = budget.choose(args.budget_bytes, probe, args.temperature)
    except ValueError as e:
        raise UsageError(f"--budget-bytes: {e}") from None
    if pick["kind"] == "topk":
        args.k, size = pick["k"], f"top-{pick['k']} (bucket tail)"
    else:
        args.num_samples = pick["num_samples"]
        size = f"sampled, {pick['num_samples']} draws ({pick['unique']:.1f} unique ids a row on average)"
    print(f"--budget-bytes {args.budget_bytes:g}: {size}, about {pick['bytes_per_token']:.1f} bytes/token at "
          f"V = {probe.shape[-1]}; chosen by {pick['why']}", file=sys.stderr)


def _check_resume(args, writer, tokens) -> None:
    """A resumed cache continues this very input: its tokens so far are the input's first ones."""
    start = writer.num_tokens
    if not start:
        return
    if start > tokens.numel():
        raise SystemExit(f"{args.output!r} already holds {start} tokens but --input has {tokens.numel()}: "
                         "it was written from another input")
    if start % args.seq_len and start != tokens.numel():
        raise SystemExit(f"{args.output!r} ends inside a sequence (token {start}, --seq-len "
                         f"{args.seq_len}): resume with the --seq-len it was written with")
    if writer.manifest["has_tokens"]:
        cached = TeacherCache(args.output).tokens(0, start)
        differ = (cached != tokens[:start]).nonzero()
        if differ.numel():
            i = int(differ[0, 0])
            raise SystemExit(f"{args.output!r} was written from another input: cache token {i} is "
                             f"{int(cached[i])}, --input has {int(tokens[i])} (resume with the same "
                             "--input, or write to another directory)")


def _fill(args, tokens, teacher, writer, start, step, bar, vocab) -> None:
    """Run the teacher over tokens [start, end) a batch at a time and append its rows."""
    with torch.no_grad():
        for a in range(start, tokens.numel(), step):
            chunk = tokens[a:a + step]
            full = chunk.numel() // args.seq_len * args.seq_len
            parts = [chunk[:full].view(-1, args.seq_len)] if full else []
            if full < chunk.numel():
                parts.append(chunk[full:].view(1, -1))  # the stream's last, shorter sequence
            for ids in parts:
                logits = _logits(teacher, ids.to(args.device))
                if logits.shape[-1] != vocab:
                    raise ValueError(f"the teacher's vocabulary changed from V = {vocab} to V = "
                                     f"{logits.shape[-1]} at token {a}")
                if args.k:
                    rows = topk_teacher(logits, k=args.k, temperature=args.temperature)
                else:
                    gen = torch.Generator(device=logits.device).manual_seed(args.seed * 1_000_003 + a)
                    rows = sample_teacher(logits, num_samples=args.num_samples,
                                          temperature=args.temperature, generator=gen)
                writer.append(rows, ids)
            bar.update(chunk.numel())
