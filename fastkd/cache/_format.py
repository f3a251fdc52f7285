"""The cache's format fields: the settings a manifest records, checked as if hostile, and the
layout of a shard that follows from them (docs/cache-format.md).

A manifest is JSON anyone can edit and re-checksum, so a reader trusts none of it: every field is
checked by type, range and consistency before use (`check_manifest`), and every shard's own
safetensors header against the layout the manifest implies (`shard_layout`). Anything else is a
CacheError naming the field.
"""
import math  # noqa: F401  (cache_settings)
import re

from . import _bits, _codec
from .._options import KINDS

SETTINGS = ("kind", "k", "num_samples", "vocab_size", "temperature", "teacher", "seq_len",
            "id_bits", "count_bits", "logprob_quantisation", "has_tokens")
SHARD_NAME = re.compile(r"shard-(\d{5,})\.safetensors")
MAX_SHARD_BYTES = 1 << 40


def cache_settings(*, vocab_size: int, kind: str, k: int | None = None, num_samples: int | None = None,
                   temperature: float, teacher: str, seq_len: int | None = None, has_tokens: bool = True) -> dict:
    """The manifest fields that fix a cache's format (everything but its shard list)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= 1 << _bits.MAX_WIDTH:
        raise ValueError(f"vocab_size must be an int in [1, {1 << _bits.MAX_WIDTH}], got {vocab_size!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "topk":
        if num_samples is not None:
            raise ValueError("num_samples is for kind='sampled'; a top-k cache takes k")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab_size:
            raise ValueError(f"k must be an int in [1, vocab_size={vocab_size}], got {k!r}")
    else:
        if k is not None:
            raise ValueError("k is for kind='topk'; a sampled cache takes num_samples")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or not 1 <= num_samples <= 255:
            raise ValueError(f"num_samples must be an int in [1, 255], got {num_samples!r}")
        k = num_samples
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if not isinstance(teacher, str) or not teacher:
        raise ValueError(f"teacher must be a non-empty name, got {teacher!r}")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise ValueError(f"seq_len must be a positive int or None, got {seq_len!r}")
    return {
        "kind": kind, "k": k, "num_samples": num_samples, "vocab_size": vocab_size,
        "temperature": float(temperature), "teacher": teacher, "seq_len": seq_len,
        "id_bits": _bits.width_for(vocab_size),
        "count_bits": _bits.width_for(num_samples + 1) if kind == "sampled" else None,
        "logprob_quantisation": _codec.logprob_quantisation(k) if kind == "topk" else None,
        "has_tokens": bool(has_tokens),
    }


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_manifest(m: dict, error) -> None:
    """Check every field of manifest `m` (already checksummed); `error(field, why)` -> exception."""
    try:
        derived = cache_settings(
            vocab_size=m.get("vocab_size"), kind=m.get("kind"), k=m.get("k") if m.get("kind") == "topk" else None,
            num_samples=m.get("num_samples"), temperature=m.get("temperature"), teacher=m.get("teacher"),
            seq_len=m.get("seq_len"), has_tokens=m.get("has_tokens"))
    except (ValueError, TypeError) as e:
        raise error(str(e).split(" ")[0], str(e)) from None
    if not isinstance(m.get("temperature"), (int, float)) or isinstance(m.get("temperature"), bool):
        raise error("temperature", f"must be a number, got {m.get('temperature')!r}")
    if not isinstance(m.get("has_tokens"), bool):
        raise error("has_tokens", f"must be true or false, got {m.get('has_tokens')!r}")
    for key in SETTINGS:
        if m.get(key) != derived[key]:
            raise error(key, f"is {m.get(key)!r}, but vocab_size, kind and k give {derived[key]!r}")
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise error("shards", f"must be a list, got {type(shards).__name__}")
    total = 0
    for i, e in enumerate(shards):
        where = f"shards[{i}]"
        if not isinstance(e, dict):
            raise error(where, "must be an object")
        if e.get("file") != f"shard-{i:05d}.safetensors":
            raise error(f"{where}.file", f"must be 'shard-{i:05d}.safetensors' (shards are named in "
                                          f"token order), got {e.get('file')!r}")
        if not _is_int(e.get("bytes")) or not 8 < e["bytes"] <= MAX_SHARD_BYTES:
            raise error(f"{where}.bytes", f"must be an int in (8, 2^40], got {e.get('bytes')!r}")
        if not isinstance(e.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", e["sha256"]):
            raise error(f"{where}.sha256", f"must be 64 hex digits, got {e.get('sha256')!r}")
        if not _is_int(e.get("num_tokens")) or not 1 <= e["num_tokens"] <= 8 * e["bytes"]:
            raise error(f"{where}.num_tokens",
                        f"must be an int in [1, 8 x the shard's bytes], got {e.get('num_tokens')!r}")
        if _codec.ragged(m):
            if not _is_int(e.get("num_entries")) or not 0 <= e["num_entries"] <= e["num_tokens"] * m["k"]:
                raise error(f"{where}.num_entries", f"must be an int in [0, num_tokens x num_samples], got "
                                                    f"{e.get('num_entries')!r}")
        elif "num_entries" in e:
            raise error(f"{where}.num_entries", "is for ragged (sampled, format version 2) caches only")
        total += e["num_tokens"]
    if not _is_int(m.get("num_tokens")) or m["num_tokens"] != total:
        raise error("num_tokens", f"is {m.get('num_tokens')!r}, but the shards hold {total} tokens")


def shard_layout(m: dict, n: int, entries: int | None = None) -> dict:
    """{tensor name: (safetensors dtype, shape)} of a shard of n tokens of the cache `m`
    (`entries`: the ids a ragged shard stores, its manifest entry's num_entries)."""
    k, w = m["k"], m["id_bits"]
    stored = entries if _codec.ragged(m) else n * k
    out = {"ids": ("U8", [_bits.packed_bytes(stored, w)])}
    if m["kind"] == "topk":
        bitmap = m["logprob_quantisation"]["code_storage"] == "monotone-bitmap"
        out["codes"] = ("U8", [n, _bits.monotone_bytes(k - 1, _codec.PAD_CODE) if bitmap else k - 1])
        out["top_logprob"] = ("F32", [n])
        out["tail_logmass"] = ("F32", [n])
    else:
        out["counts"] = ("U8", [_bits.packed_bytes(stored, m["count_bits"])])
        if _codec.ragged(m):
            out["lengths"] = ("U8", [_bits.packed_bytes(n, m["count_bits"])])
    if m["has_tokens"]:
        out["tokens"] = ("U8", [_bits.packed_bytes(n, w)])
    return out
