"""CacheWriter: appends SparseTeacher rows to a teacher-logit cache directory, shard by shard.

    with fastkd.cache.CacheWriter("cache/", vocab_size=32000, kind="topk", k=64,
                                  temperature=2.0, teacher="my-teacher") as w:
        for tokens in batches:                      # [B, L] token ids
            w.append(fastkd.topk_teacher(teacher(tokens), k=64, temperature=2.0), tokens)

Rows are buffered until at least `shard_tokens` are held, then written as one shard (atomically)
and recorded in the manifest; `close()` writes what is left. A writer killed at any point leaves
a valid cache of the shards written so far; opening the same directory again with the same
settings resumes it (`num_tokens` says where), and different settings are refused. A live writer
holds an exclusive flock on the directory itself (nothing that can be deleted from under it).
"""
import fcntl
import math
import os
import re

import torch

from . import _bits, _codec, _format, _store
from .._version import __version__
from ..sparse_teacher import SparseTeacher

SHARD_TOKENS = 1 << 16
OWN_TMP = re.compile(r"(manifest\.json|shard-\d{5,}\.safetensors)\.tmp")  # what write_atomic leaves when killed


class CacheWriter:
    """Writes (or resumes) the cache in `directory`; see the module docstring."""

    def __init__(self, directory: str, *, vocab_size: int, kind: str = "topk", k: int | None = None,
                 num_samples: int | None = None, temperature: float, teacher: str,
                 seq_len: int | None = None, has_tokens: bool = True, shard_tokens: int = SHARD_TOKENS):
        if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
            raise ValueError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
        settings = _format.cache_settings(vocab_size=vocab_size, kind=kind, k=k, num_samples=num_samples,
                                  temperature=temperature, teacher=teacher, seq_len=seq_len,
                                  has_tokens=has_tokens)
        self.directory, self.shard_tokens = directory, shard_tokens
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise _store.CacheError(f"{directory!r} is a file, not a cache directory")
        os.makedirs(directory, exist_ok=True)
        self._lock = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))  # held while this writer lives
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise _store.CacheError(f"{directory!r} is being written by another CacheWriter "
                                    "(another process, or an unclosed writer)") from None
        try:
            self.manifest = self._open(settings)
        except BaseException:
            os.close(self._lock)
            raise
        self._pending: list[tuple[SparseTeacher, torch.Tensor | None]] = []
        self._failed: BaseException | None = None  # a flush that failed: appends refused until one succeeds

    def _open(self, settings: dict) -> dict:
        """The manifest to continue: the directory's (same settings only) or a new, empty one."""
        directory = self.directory
        names = os.listdir(directory)
        if _store.MANIFEST in names:
            manifest = _store.read_manifest(directory)
            diff = [f"{key}: cache has {manifest.get(key)!r}, asked for {settings[key]!r}"
                    for key in _format.SETTINGS if manifest.get(key) != settings[key]]
            if diff:
                raise _store.CacheError(f"{directory!r} holds a cache with other settings; use a new "
                                        "directory to write a different one (" + "; ".join(diff) + ")")
        else:
            orphans = sorted(n for n in names if _format.SHARD_NAME.fullmatch(n))
            if orphans:
                raise _store.CacheError(
                    f"{directory!r} holds shard files ({', '.join(orphans[:3])}{', ...' if len(orphans) > 3 else ''}) "
                    f"but no {_store.MANIFEST}: refusing to write over them; move them away, or write to "
                    "another directory")
            manifest = {"format": _store.FORMAT, "format_version": _store.FORMAT_VERSION,
                        **settings, "num_tokens": 0, "shards": [], "created_by": f"fastkd {__version__}"}
        for stale in names:  # only this format's own temporary files: a write killed before its rename
            if OWN_TMP.fullmatch(stale):
                os.remove(os.path.join(directory, stale))
        if _store.MANIFEST not in names:
            _store.write_manifest(directory, manifest)
        return manifest

    @property
    def num_tokens(self) -> int:
        """Tokens written to shards so far (where a resumed writer continues)."""
        return self.manifest["num_tokens"]

    def append(self, teacher: SparseTeacher, tokens: torch.Tensor | None = None) -> None:
        """Add rows: `teacher` [..., k] and, when the cache keeps them, the input token ids [...]."""
        if self._lock is None:
            raise _store.CacheError(f"{self.directory!r}: this CacheWriter is closed")
        if self._failed is not None:
            raise _store.CacheError(
                f"{self.directory!r}: writing a shard failed ({self._failed!r}); its rows are still "
                "buffered, so appending more would shift every later token. close() retries them (or "
                "reopen the directory, which resumes after the last shard written)")
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
        bad = rows.logprobs.isnan().any(-1) | rows.tail_logmass.isnan()
        if bad.any():  # a teacher row with a NaN or +inf logit (docs/math.md): never cached as data
            r = int(bad.nonzero()[0, 0])
            raise ValueError(f"teacher: row {r} of this batch (cache token {self.num_tokens + self._buffered() + r}) "
                             "is NaN: the teacher's logits there hold a NaN or +inf (an fp16 overflow?)")
        high = (rows.logprobs > 1e-3).any(-1) | (rows.tail_logmass > 1e-3)
        if high.any():
            r = int(high.nonzero()[0, 0])
            raise ValueError(f"teacher: row {r} has log-probs above 0 (raw logits?); cache rows from "
                             "fastkd.topk_teacher or fastkd.sample_teacher")
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
        """Write the buffered rows as one shard and record it in the manifest (replaced last, so
        an interrupt or an error anywhere leaves the cache as it was). The buffer is emptied only
        once the manifest lists the shard: a failed write (a full disk) keeps every row, and the
        next flush or close() writes the same rows again -- never a shorter, shifted cache."""
        if self._lock is None:
            raise _store.CacheError(f"{self.directory!r}: this CacheWriter is closed")
        n = self._buffered()
        if not n:
            return
        m = self.manifest
        rows = _codec.cat_rows([rows for rows, _ in self._pending], m)
        tensors, entries = _codec.encode(rows, m), _codec.num_entries(rows, m)
        if m["has_tokens"]:
            tensors["tokens"] = _bits.pack(torch.cat([t for _, t in self._pending]), m["id_bits"])
        name = f"shard-{len(m['shards']):05d}.safetensors"
        data = _store.shard_bytes(tensors, {"format": _store.FORMAT, "num_tokens": n, "first_token": m["num_tokens"]})
        try:
            entry = dict(_store.write_shard(self.directory, name, data), num_tokens=n,
                         **({} if entries is None else {"num_entries": entries}))
            updated = dict(m, shards=m["shards"] + [entry], num_tokens=m["num_tokens"] + n)
            _store.write_manifest(self.directory, updated)
        except BaseException as e:
            self._failed = e
            raise
        self.manifest, self._pending, self._failed = updated, [], None

    def close(self) -> None:
        """Write what is buffered and release the directory."""
        if self._lock is None:
            return
        self.flush()
        self.abandon()

    def abandon(self) -> None:
        """Release the directory without writing what is buffered (at most one shard's rows,
        which a resumed run recomputes): the cache keeps the shards already written."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:  # keep the shards written so far; what is buffered may be incomplete
            self.abandon()
