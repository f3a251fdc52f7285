"""CacheWriter: appends SparseTeacher rows to a teacher-logit cache directory, shard by shard.

    with fastkd.cache.CacheWriter("cache/", vocab_size=32000, kind="topk", k=64,
                                  temperature=2.0, teacher="my-teacher") as w:
        for tokens in batches:                      # [B, L] token ids
            w.append(fastkd.topk_teacher(teacher(tokens), k=64, temperature=2.0), tokens)

Rows are buffered until at least `shard_tokens` are held, then written as one shard (atomically)
and recorded in the manifest; `close()` writes what is left. A writer killed at any point leaves
a valid cache of the shards written so far; opening the same directory again with the same
settings resumes it (`num_tokens` says where), and different settings are refused.
"""
import fcntl
import glob
import math
import os

import torch

from . import _bits, _codec, _store
from .._version import __version__
from ..sparse_teacher import KINDS, SparseTeacher

SHARD_TOKENS = 1 << 16
LOCK = ".writer.lock"  # flock'd by the live writer; not part of the format (a killed one releases it)
_SETTINGS = ("kind", "k", "num_samples", "vocab_size", "temperature", "teacher", "seq_len",
             "id_bits", "count_bits", "logprob_quantisation", "has_tokens")


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


class CacheWriter:
    """Writes (or resumes) the cache in `directory`; see the module docstring."""

    def __init__(self, directory: str, *, vocab_size: int, kind: str = "topk", k: int | None = None,
                 num_samples: int | None = None, temperature: float, teacher: str,
                 seq_len: int | None = None, has_tokens: bool = True, shard_tokens: int = SHARD_TOKENS):
        if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
            raise ValueError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
        settings = cache_settings(vocab_size=vocab_size, kind=kind, k=k, num_samples=num_samples,
                                  temperature=temperature, teacher=teacher, seq_len=seq_len,
                                  has_tokens=has_tokens)
        self.directory, self.shard_tokens = directory, shard_tokens
        os.makedirs(directory, exist_ok=True)
        self._lock = open(os.path.join(directory, LOCK), "a")  # held while this writer lives
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise _store.CacheError(f"{directory!r} is being written by another CacheWriter "
                                    "(another process, or an unclosed writer)") from None
        try:
            self.manifest = self._open(settings)
        except BaseException:
            self._lock.close()
            raise
        self._pending: list[tuple[SparseTeacher, torch.Tensor | None]] = []

    def _open(self, settings: dict) -> dict:
        """The manifest to continue: the directory's (same settings only) or a new, empty one."""
        directory = self.directory
        for stale in glob.glob(os.path.join(glob.escape(directory), "*.tmp")):
            os.remove(stale)  # a write that was killed before its rename
        if os.path.exists(os.path.join(directory, _store.MANIFEST)):
            manifest = _store.read_manifest(directory)
            diff = [f"{key}: cache has {manifest.get(key)!r}, asked for {settings[key]!r}"
                    for key in _SETTINGS if manifest.get(key) != settings[key]]
            if diff:
                raise _store.CacheError(f"{directory!r} holds a cache with other settings; use a new "
                                        "directory to write a different one (" + "; ".join(diff) + ")")
            return manifest
        manifest = {"format": _store.FORMAT, "format_version": _store.FORMAT_VERSION,
                    **settings, "num_tokens": 0, "shards": [], "created_by": f"fastkd {__version__}"}
        _store.write_manifest(directory, manifest)
        return manifest

    @property
    def num_tokens(self) -> int:
        """Tokens written to shards so far (where a resumed writer continues)."""
        return self.manifest["num_tokens"]

    def append(self, teacher: SparseTeacher, tokens: torch.Tensor | None = None) -> None:
        """Add rows: `teacher` [..., k] and, when the cache keeps them, the input token ids [...]."""
        m = self.manifest
        if not isinstance(teacher, SparseTeacher):
            raise TypeError(f"teacher must be a fastkd.SparseTeacher, got {type(teacher).__name__}")
        if teacher.kind != m["kind"] or teacher.indices.shape[-1] != m["k"]:
            want = f"top-{m['k']}" if m["kind"] == "topk" else f"sampled-{m['k']}"
            raise ValueError(f"teacher: this cache holds {want} rows, got {teacher.kind} rows with "
                             f"{teacher.indices.shape[-1]} entries")
        if not math.isclose(teacher.temperature, m["temperature"], rel_tol=1e-9):
            raise ValueError(f"teacher.temperature={teacher.temperature} but the cache was made at "
                             f"temperature={m['temperature']}")
        ids = teacher.indices.detach().reshape(-1, m["k"]).cpu()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= m["vocab_size"]):
            raise ValueError(f"teacher.indices must lie in [0, vocab_size={m['vocab_size']}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        n = ids.shape[0]
        if teacher.logprobs.shape != teacher.indices.shape or teacher.tail_logmass.numel() != n:
            raise ValueError(f"teacher: logprobs {tuple(teacher.logprobs.shape)} and tail_logmass "
                             f"{tuple(teacher.tail_logmass.shape)} do not fit indices {tuple(teacher.indices.shape)}")
        rows = SparseTeacher(ids, teacher.logprobs.detach().reshape(-1, m["k"]).float().cpu(),
                             teacher.tail_logmass.detach().reshape(-1).float().cpu(), m["temperature"], m["kind"])
        if m["kind"] == "sampled":  # log(count / num_samples), counts summing to num_samples (or an empty row)
            counts = rows.logprobs.double().exp() * m["num_samples"]
            total = counts.sum(-1)
            if not (torch.allclose(counts, counts.round(), atol=1e-3)
                    and ((total - m["num_samples"]).abs().lt(1e-3) | total.eq(0)).all()):
                raise ValueError(f"teacher: a sampled row's logprobs must be log(count / {m['num_samples']}) "
                                 "with counts summing to num_samples, as fastkd.sample_teacher makes them")
        if m["has_tokens"]:
            if tokens is None:
                raise ValueError("tokens: this cache keeps the input token ids; pass them with the rows")
            tokens = tokens.detach().reshape(-1).cpu()
            if tokens.numel() != ids.shape[0]:
                raise ValueError(f"tokens has {tokens.numel()} ids for {ids.shape[0]} teacher rows")
            if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= m["vocab_size"]):
                raise ValueError(f"tokens must lie in [0, vocab_size={m['vocab_size']})")
        elif tokens is not None:
            raise ValueError("tokens: this cache was opened with has_tokens=False")
        self._pending.append((rows, tokens))  # one step, so an interrupt leaves the buffer whole
        if self._buffered() >= self.shard_tokens:
            self.flush()

    def _buffered(self) -> int:
        return sum(rows.indices.shape[0] for rows, _ in self._pending)

    def flush(self) -> None:
        """Write the buffered rows as one shard and record it in the manifest. The buffer is
        taken first and the manifest replaced last, so an interrupt anywhere in between leaves
        the cache as it was (the rows are lost, not doubled; a resumed run recomputes them)."""
        pending, self._pending = self._pending, []
        n = sum(rows.indices.shape[0] for rows, _ in pending)
        if not n:
            return
        m = self.manifest
        tensors = _codec.encode(_codec.cat_rows([rows for rows, _ in pending], m), m)
        if m["has_tokens"]:
            tensors["tokens"] = _bits.pack(torch.cat([t for _, t in pending]), m["id_bits"])
        name = f"shard-{len(m['shards']):05d}.safetensors"
        data = _store.shard_bytes(tensors, {"format": _store.FORMAT, "num_tokens": n, "first_token": m["num_tokens"]})
        entry = dict(_store.write_shard(self.directory, name, data), num_tokens=n)
        updated = dict(m, shards=m["shards"] + [entry], num_tokens=m["num_tokens"] + n)
        _store.write_manifest(self.directory, updated)
        self.manifest = updated

    def close(self) -> None:
        """Write what is buffered and release the directory."""
        if self._lock.closed:
            return
        self.flush()
        self._lock.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:  # keep the shards written so far; what is buffered may be incomplete
            self._lock.close()
