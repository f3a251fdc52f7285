"""Which cache to write for a byte budget (`python -m fastkd cache --budget-bytes B`): the scheme,
and its k or its draws, that the measured frontier ranks best at B bytes per token, sized for this
teacher's vocabulary and distribution.

The frontier is `python -m fastkd study cache`'s (docs/fidelity.md): validation loss of students
trained from caches of each scheme and size. A cache's bytes per token follow from the format
(docs/cache-format.md) and V; a sampled cache's also from how many unique ids its draws give,
which depends on the teacher, so it is calibrated on the teacher's own rows (`probe`).
"""
from . import _bits, _codec
from ..sparse_teacher import expected_unique

# The frontier measured by `python -m fastkd study cache` (V = 8192, T = 1, 3 seeds; docs/fidelity.md):
# family -> ((size, mean validation loss of the students), ...), the size being top-k's k or the
# sampled cache's mean unique ids per row. Lower is better; dense KD (no cache) scored DENSE.
# The whole run: benchmarks/results/cache-study.json.
DENSE = 3.440
FRONTIER = {
    "topk": ((8, 3.945), (16, 3.734), (32, 3.573), (64, 3.484), (128, 3.442)),
    "sampled": ((4.0, 3.613), (7.2, 3.531), (10.6, 3.523), (13.9, 3.511), (27.5, 3.478)),
}


def topk_bytes(k: int, vocab: int, has_tokens: bool = True) -> float:
    """Bytes per token of a top-k cache (shard headers aside): ids, log-prob codes, top and tail."""
    w = _bits.width_for(vocab)
    bitmap = _codec.logprob_quantisation(k)["code_storage"] == "monotone-bitmap"
    codes = _bits.monotone_bytes(k - 1, _codec.PAD_CODE) if bitmap else k - 1
    return k * w / 8 + codes + 8 + (w / 8 if has_tokens else 0)


def sampled_bytes(unique: float, draws: int, vocab: int, has_tokens: bool = True) -> float:
    """Bytes per token of a sampled cache (ragged rows) holding `unique` ids a row on average."""
    w, c = _bits.width_for(vocab), _bits.width_for(draws + 1)
    return (unique * (w + c) + c + (w if has_tokens else 0)) / 8


def _measured(family: str, size: float) -> float | None:
    """The frontier's loss at the largest measured size not above `size` (None: below them all)."""
    below = [loss for s, loss in FRONTIER[family] if s <= size + 1e-9]
    return below[-1] if below else None


def choose(budget: float, probe, temperature: float, has_tokens: bool = True) -> dict:
    """The cache to write within `budget` bytes per token for a teacher whose rows `probe` ([..., V]
    logits, a batch of its own) shows -> {"kind", "k" or "num_samples", "bytes_per_token",
    "unique" (sampled), "why"}. ValueError when not even the smallest cache fits."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"budget must be a positive number of bytes per token, got {budget!r}")
    vocab = probe.shape[-1]
    options = []
    k = 0
    while k < vocab and topk_bytes(k + 1, vocab, has_tokens) <= budget:  # (grows with k)
        k += 1
    if k == vocab:  # every id fits: the cache is the teacher's exact distribution, dense KD's quality
        return {"kind": "topk", "k": k, "bytes_per_token": topk_bytes(k, vocab, has_tokens),
                "why": f"top-{k} holds every id of the V = {vocab} vocabulary: the exact teacher (dense KD, "
                       f"{DENSE:.3f} on the study's frontier), which no sampled cache beats"}
    if k:
        options.append({"kind": "topk", "k": k, "bytes_per_token": topk_bytes(k, vocab, has_tokens),
                        "expected": _measured("topk", k)})
    lo, hi = 0, 255  # the most draws whose expected bytes fit (they grow with the draws)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sampled_bytes(expected_unique(probe, mid, temperature), mid, vocab, has_tokens) <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo:
        unique = expected_unique(probe, lo, temperature)
        options.append({"kind": "sampled", "num_samples": lo, "unique": unique,
                        "bytes_per_token": sampled_bytes(unique, lo, vocab, has_tokens),
                        "expected": _measured("sampled", unique)})
    if not options:
        raise ValueError(f"budget {budget:g} bytes/token is below the smallest cache at V = {vocab}: "
                         f"top-1 takes {topk_bytes(1, vocab, has_tokens):.1f}, one draw "
                         f"{sampled_bytes(1, 1, vocab, has_tokens):.1f}")
    scored = [o for o in options if o["expected"] is not None]
    if scored:
        best = min(scored, key=lambda o: o["expected"])
        others = ", ".join(f"{o['kind']} {o['expected']:.3f}" for o in scored if o is not best)
        why = (f"the study's frontier (docs/fidelity.md), student validation loss at this size: {best['kind']} "
               f"{best['expected']:.3f}" + (f" against {others}" if others else ""))
    else:  # below every measured size: a sampled cache stays unbiased, a tiny top-k does not
        best = next((o for o in options if o["kind"] == "sampled"), options[0])
        why = "below every size the study measured (docs/fidelity.md): expect a weak teacher signal"
    best = {key: v for key, v in best.items() if key != "expected"}
    return dict(best, why=why)
