"""The cache's row codec: SparseTeacher rows <-> the arrays of one shard (docs/cache-format.md).

top-k rows are sorted by log-prob, largest first. The largest is stored as float32 (`top`);
every other entry as an 8-bit code of its distance below it, d = top - logprob >= 0 (the
codes are non-decreasing along the row; from k = 38 on they are stored as a monotone bitmap of
k + 254 bits, fewer than 8 (k - 1)):
codes 0 .. L-1 are linear (d = c * step, error <= step / 2), codes L .. 254 grow geometrically up
to `max_delta` (coarse, for entries far below the top that carry almost no mass), 255 is -inf
(padding). `step` is set from k so that the linear range covers every entry of the smallest
prefix that carries 99% of the stored mass: such an entry lies less than ln(100 (k - 1)) nats
below the top. The tail log-mass is stored as float32.

sampled rows store each unique id's count (log-prob = log(count / num_samples), exact). Format
version 2 stores them ragged: a row's length (its number of unique ids), then only its entries, so
a row costs what it holds, not the padded width num_samples (many draws, few unique ids: the
unique-id budget of `sample_teacher(unique=...)`). Version 1 stored every row padded (count 0).
"""
import math

import torch

from . import _bits
from ..sparse_teacher import SparseTeacher

PAD_CODE = 255
LINEAR_CODES = 241  # codes 0 .. 240
MAX_DELTA = 60.0  # nats below the top where the geometric codes end (and larger d are clipped)


def logprob_quantisation(k: int) -> dict:
    """The quantisation parameters for top-k rows (recorded in the manifest)."""
    reach = math.log(100.0 * max(k - 1, 1)) + 0.05
    bitmap = _bits.monotone_bytes(k - 1, PAD_CODE) < k - 1  # smaller from k = 38 on
    return {"scheme": "u8-below-top", "linear_codes": LINEAR_CODES,
            "step": reach / (LINEAR_CODES - 1), "max_delta": MAX_DELTA, "pad_code": PAD_CODE,
            "code_storage": "monotone-bitmap" if bitmap else "bytes"}


def delta_table(q: dict) -> torch.Tensor:
    """float32 [256]: the distance below the top that each code stands for (+inf for padding)."""
    lin, step = q["linear_codes"], q["step"]
    far = q["pad_code"] - lin  # geometric codes
    d_lin = torch.arange(lin, dtype=torch.float64) * step
    top_lin = (lin - 1) * step
    ratio = (q["max_delta"] / top_lin) ** (1.0 / far)
    d_far = top_lin * ratio ** torch.arange(1, far + 1, dtype=torch.float64)
    inf = torch.full((256 - q["pad_code"],), math.inf, dtype=torch.float64)
    return torch.cat([d_lin, d_far, inf]).float()


def _encode_deltas(d: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Nearest code for each distance d (float64; nan or +inf -> padding)."""
    finite = table[:PAD_CODE].double()
    mids = (finite[1:] + finite[:-1]) * 0.5
    codes = torch.bucketize(d.clamp(max=finite[-1].item()), mids)
    return torch.where(torch.isfinite(d), codes, PAD_CODE).to(torch.uint8)


def cat_rows(parts: list, meta: dict) -> SparseTeacher:
    """Flat row blocks ([n_i, k] each) -> one SparseTeacher [sum n_i, k] of the cache's kind."""
    k = meta["k"]
    fields = [[p.indices for p in parts] or [torch.empty(0, k, dtype=torch.long)],
              [p.logprobs for p in parts] or [torch.empty(0, k)],
              [p.tail_logmass for p in parts] or [torch.empty(0)]]
    return SparseTeacher(*(f[0] if len(f) == 1 else torch.cat(f) for f in fields), meta["temperature"], meta["kind"])


def _bitmap(meta: dict) -> bool:
    return meta["logprob_quantisation"]["code_storage"] == "monotone-bitmap"


def ragged(meta: dict) -> bool:
    """Whether this cache stores its rows ragged (sampled rows, format version 2 on)."""
    return meta["kind"] == "sampled" and meta.get("format_version", 1) >= 2


def num_entries(rows: SparseTeacher, meta: dict) -> int | None:
    """The entries a shard of these rows stores when ragged (its manifest entry's num_entries)."""
    return int(torch.isfinite(rows.logprobs).sum()) if ragged(meta) else None


def encode(rows: SparseTeacher, meta: dict) -> dict:
    """Flat rows ([n, k]) -> the shard's tensors."""
    ids, lp = rows.indices, rows.logprobs
    n, k = ids.shape
    if meta["kind"] == "topk":
        lp, order = lp.sort(dim=-1, descending=True, stable=True)
        ids = ids.gather(-1, order)
        top = lp[:, 0].float()
        d = top.double().unsqueeze(-1) - lp[:, 1:].double()
        d = torch.where(lp[:, 1:] > float("-inf"), d, math.inf)
        codes = _encode_deltas(d, delta_table(meta["logprob_quantisation"]))  # non-decreasing per row
        out = {"top_logprob": top.contiguous(), "tail_logmass": rows.tail_logmass.float().contiguous(),
               "codes": _bits.pack_monotone(codes, PAD_CODE) if _bitmap(meta) else codes.contiguous()}
    else:
        counts = torch.round(lp.double().exp() * meta["num_samples"]).to(torch.int64)
        if ragged(meta):  # a row's unique ids come first (sample_teacher's order): keep those only
            real = counts > 0
            ids, counts = ids[real], counts[real]
            out = {"lengths": _bits.pack(real.sum(-1), meta["count_bits"])}
        else:
            out = {}
        out["counts"] = _bits.pack(counts, meta["count_bits"])
    out["ids"] = _bits.pack(ids, meta["id_bits"])
    return out


def check_ragged(arrays: dict, meta: dict, n: int, entries: int) -> str | None:
    """Why a ragged shard of n rows does not hold the `entries` its manifest entry says (None: it does)."""
    lengths = _bits.unpack(arrays["lengths"], meta["count_bits"], 0, n)
    total = int(lengths.sum())
    return None if total == entries else f"its rows hold {total} entries, the manifest says {entries}"


def _unpack_ragged(arrays: dict, meta: dict, start: int, stop: int) -> tuple:
    """Rows [start, stop) of a ragged shard -> (ids, counts), [n, num_samples] with padding (0, 0)."""
    k, n, c = meta["k"], stop - start, meta["count_bits"]
    lengths = _bits.unpack(arrays["lengths"], c, 0, stop)  # (offsets: the lengths before the range)
    if lengths.numel() and int(lengths.max()) > k:
        raise ValueError(f"a sampled row with {int(lengths.max())} entries, more than num_samples={k}")
    first = int(lengths[:start].sum())
    lengths = lengths[start:]
    last = first + int(lengths.sum())
    if last > arrays["ids"].numel() * 8 // meta["id_bits"]:
        raise ValueError("row lengths that run past the shard's entries")
    row = torch.repeat_interleave(torch.arange(n), lengths)
    col = torch.arange(last - first) - (lengths.cumsum(0) - lengths).repeat_interleave(lengths)
    ids = torch.zeros(n, k, dtype=torch.long)
    counts = torch.zeros(n, k, dtype=torch.long)
    ids[row, col] = _bits.unpack(arrays["ids"], meta["id_bits"], first, last)
    counts[row, col] = _bits.unpack(arrays["counts"], c, first, last)
    if counts.numel() and bool((counts[row, col] == 0).any()):
        raise ValueError("a stored sampled entry with count 0")
    return ids, counts


def decode(arrays: dict, meta: dict, start: int, stop: int, table: torch.Tensor | None = None) -> SparseTeacher:
    """Rows [start, stop) of one shard's tensors -> SparseTeacher ([stop - start, k]). `table`:
    delta_table(meta["logprob_quantisation"]), passed by callers that decode often."""
    k, n = meta["k"], stop - start
    if ragged(meta):
        ids, counts = _unpack_ragged(arrays, meta, start, stop)
    else:
        ids = _bits.unpack(arrays["ids"], meta["id_bits"], start * k, stop * k).view(n, k)
    if meta["kind"] == "topk":
        top = arrays["top_logprob"][start:stop]
        table = delta_table(meta["logprob_quantisation"]) if table is None else table
        lp = torch.empty(n, k, dtype=torch.float32)
        lp[:, 0] = top
        codes = arrays["codes"][start:stop]
        codes = _bits.unpack_monotone(codes, k - 1) if _bitmap(meta) else codes.long()
        torch.sub(top.unsqueeze(-1), table[codes], out=lp[:, 1:])
        tail = arrays["tail_logmass"][start:stop].clone()
    else:
        if not ragged(meta):
            counts = _bits.unpack(arrays["counts"], meta["count_bits"], start * k, stop * k).view(n, k)
        total = counts.sum(-1)
        if counts.numel() and (int(counts.max()) > meta["num_samples"]
                               or not ((total == meta["num_samples"]) | (total == 0)).all()):
            raise ValueError(f"sampled counts must add up to num_samples={meta['num_samples']} per row")
        logs = torch.arange(meta["num_samples"] + 1, dtype=torch.float64).div(meta["num_samples"]).log()
        lp = logs.float()[counts]
        tail = torch.full((n,), float("-inf"))
    return SparseTeacher(ids, lp, tail, meta["temperature"], meta["kind"])
