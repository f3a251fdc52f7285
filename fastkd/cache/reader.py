"""TeacherCache: random access to a teacher-logit cache; TeacherCacheDataset: a torch Dataset over it.

    cache = fastkd.cache.TeacherCache("cache/", vocab_size=32000, temperature=2.0)
    teacher = cache[4096:4096 + 8192]        # SparseTeacher, [8192, k]
    loss = fastkd.sparse_kd_loss(student_logits, teacher)

Shards are read into memory when touched (the last `max_shards` of them stay), each time checked
against its sha256 and the layout the manifest implies; decoded values are range-checked.
"""
import bisect
import collections
import math

import torch

from . import _bits, _codec, _store
from ..sparse_teacher import SparseTeacher


class TeacherCache:
    """The cache in `directory`. `vocab_size` / `temperature`: when given, a cache made for another
    vocabulary or temperature is refused. `verify`: check each shard's sha256 when it is read.
    `max_shards`: how many shards stay in memory (least recently used first out)."""

    def __init__(self, directory: str, *, vocab_size: int | None = None,
                 temperature: float | None = None, verify: bool = True, max_shards: int = 8):
        if isinstance(max_shards, bool) or not isinstance(max_shards, int) or max_shards < 1:
            raise ValueError(f"max_shards must be a positive int, got {max_shards!r}")
        self.directory, self.verify, self.max_shards = directory, verify, max_shards
        self.manifest = m = _store.read_manifest(directory)
        if vocab_size is not None and vocab_size != m["vocab_size"]:
            raise _store.CacheError(f"{directory!r} was made for vocab_size={m['vocab_size']}, "
                                    f"the student has vocab_size={vocab_size}")
        if temperature is not None and not math.isclose(temperature, m["temperature"], rel_tol=1e-9):
            raise _store.CacheError(f"{directory!r} holds the teacher at temperature={m['temperature']}, "
                                    f"asked for temperature={temperature} (a sparse teacher's "
                                    "temperature is fixed when it is cached)")
        self._starts = [0]
        for entry in m["shards"]:  # (read_manifest checked that they add up to num_tokens)
            self._starts.append(self._starts[-1] + entry["num_tokens"])
        self._shards = collections.OrderedDict()
        self._table = _codec.delta_table(m["logprob_quantisation"]) if m["kind"] == "topk" else None

    def __len__(self) -> int:
        return self.manifest["num_tokens"]

    def __getstate__(self):  # for DataLoader workers: send the manifest, not the shards read
        state = self.__dict__.copy()
        state["_shards"] = collections.OrderedDict()
        return state

    @property
    def temperature(self) -> float:
        return self.manifest["temperature"]

    @property
    def bytes_per_token(self) -> float:
        """Shard bytes (all of them: teacher rows, token ids, headers) per cached token."""
        return sum(e["bytes"] for e in self.manifest["shards"]) / max(len(self), 1)

    def _shard(self, i: int) -> dict:
        if i in self._shards:
            self._shards.move_to_end(i)
        else:
            self._shards[i] = _store.read_shard(self.directory, self.manifest["shards"][i], self.manifest, self.verify)
            while len(self._shards) > self.max_shards:
                self._shards.popitem(last=False)
        return self._shards[i]

    def verify_all(self) -> None:
        """Check every shard's sha256 and layout now (CacheError on the first mismatch)."""
        for entry in self.manifest["shards"]:
            _store.read_shard(self.directory, entry, self.manifest, verify=True)

    def _pieces(self, start: int, stop: int):
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"token range [{start}, {stop}) outside the cache's [0, {len(self)})")
        i = bisect.bisect_right(self._starts, start) - 1
        while start < stop:
            end = min(stop, self._starts[i + 1])
            yield i, start - self._starts[i], end - self._starts[i]
            start, i = end, i + 1

    def read(self, start: int, stop: int) -> SparseTeacher:
        """Teacher rows of tokens [start, stop): SparseTeacher with [stop - start, k] entries."""
        m = self.manifest
        return _codec.cat_rows([self._decoded(i, a, b) for i, a, b in self._pieces(start, stop)], m)

    def _decoded(self, i: int, start: int, stop: int) -> SparseTeacher:
        """Rows [start, stop) of shard i, decoded and range-checked, else CacheError naming the shard."""
        m, why = self.manifest, None
        arrays = self._shard(i)  # (a CacheError of its own, naming the file)
        try:
            rows = _codec.decode(arrays, m, start, stop, self._table)
        except (ValueError, RuntimeError) as e:  # a bitmap or counts that no writer makes
            where = f"{self.directory}/{m['shards'][i]['file']}"
            raise _store.CacheError(f"{where}: {e} (a corrupt or forged shard)") from None
        if rows.indices.numel() and int(rows.indices.max()) >= m["vocab_size"]:
            why = f"an id {int(rows.indices.max())} beyond vocab_size={m['vocab_size']}"
        elif rows.logprobs.isnan().any() or rows.tail_logmass.isnan().any():
            why = "a NaN log-prob"
        elif (rows.logprobs > 1e-3).any() or (rows.tail_logmass > 1e-3).any():
            why = "a log-prob above 0"
        if why:
            raise _store.CacheError(f"{self.directory}/{m['shards'][i]['file']}: {why} (a corrupt or forged shard)")
        return rows

    def tokens(self, start: int, stop: int) -> torch.Tensor:
        """The input token ids of tokens [start, stop) (int64), when the cache keeps them."""
        if not self.manifest["has_tokens"]:
            raise _store.CacheError(f"{self.directory!r} was written without the input token ids")
        parts = [_bits.unpack(self._shard(i)["tokens"], self.manifest["id_bits"], a, b)
                 for i, a, b in self._pieces(start, stop)]
        ids = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
        if ids.numel() and int(ids.max()) >= self.manifest["vocab_size"]:
            raise _store.CacheError(f"{self.directory!r}: an input token id {int(ids.max())} beyond "
                                    f"vocab_size={self.manifest['vocab_size']} (a corrupt or forged shard)")
        return ids

    def __getitem__(self, key) -> SparseTeacher:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("a cache slice must have step 1")
            return self.read(start, max(start, stop))
        index = key + len(self) if key < 0 else key
        row = self.read(index, index + 1)
        return SparseTeacher(row.indices[0], row.logprobs[0], row.tail_logmass[0], row.temperature, row.kind)


class TeacherCacheDataset(torch.utils.data.Dataset):
    """Sequences of `seq_len` tokens (default: the manifest's) from a cache; a last partial
    sequence is dropped. Item i: {"indices" [L, k], "logprobs" [L, k], "tail_logmass" [L] and,
    when kept, "input_ids" [L]}; `teacher(batch)` turns a (collated) item back into a SparseTeacher."""

    def __init__(self, cache: TeacherCache, seq_len: int | None = None):
        seq_len = seq_len or cache.manifest["seq_len"]
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int (the cache records {cache.manifest['seq_len']!r})")
        self.cache, self.seq_len = cache, seq_len

    def __len__(self) -> int:
        return len(self.cache) // self.seq_len

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} outside [0, {len(self)})")
        a, b = i * self.seq_len, (i + 1) * self.seq_len
        rows = self.cache.read(a, b)
        item = {"indices": rows.indices, "logprobs": rows.logprobs, "tail_logmass": rows.tail_logmass}
        if self.cache.manifest["has_tokens"]:
            item["input_ids"] = self.cache.tokens(a, b)
        return item

    def teacher(self, batch: dict) -> SparseTeacher:
        return SparseTeacher(batch["indices"], batch["logprobs"], batch["tail_logmass"],
                             self.cache.temperature, self.cache.manifest["kind"])
