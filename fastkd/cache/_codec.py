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

sampled rows store each unique id's count (log-prob = log(count / num_samples), exact); count 0
is padding.
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
        out = {"counts": _bits.pack(counts, meta["count_bits"])}
    out["ids"] = _bits.pack(ids, meta["id_bits"])
    return out


def decode(arrays: dict, meta: dict, start: int, stop: int, table: torch.Tensor | None = None) -> SparseTeacher:
    """Rows [start, stop) of one shard's tensors -> SparseTeacher ([stop - start, k]). `table`:
    delta_table(meta["logprob_quantisation"]), passed by callers that decode often."""
    k, n = meta["k"], stop - start
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
        counts = _bits.unpack(arrays["counts"], meta["count_bits"], start * k, stop * k).view(n, k)
        total = counts.sum(-1)
        if counts.numel() and (int(counts.max()) > meta["num_samples"]
                               or not ((total == meta["num_samples"]) | (total == 0)).all()):
            raise ValueError(f"sampled counts must add up to num_samples={meta['num_samples']} per row")
        logs = torch.arange(meta["num_samples"] + 1, dtype=torch.float64).div(meta["num_samples"]).log()
        lp = logs.float()[counts]
        tail = torch.full((n,), float("-inf"))
    return SparseTeacher(ids, lp, tail, meta["temperature"], meta["kind"])
