"""VocabShard -- this rank's slice of a vocabulary split over a process group -- and the agreement
(step 0 of docs/distributed.md): one all_gather of HEADER per call, so that every rank makes the same
call or every rank raises; `refused` runs a rank's local checks inside that guard."""
import hashlib
from dataclasses import dataclass
from numbers import Integral

import torch

HEADER = ("ok", "rows", "size", "start", "total", "options", "grad", "content")


def _dist():
    import torch.distributed as dist  # (imported on use: fastkd works where torch.distributed does not)

    return dist


def _int_or_none(name, x):
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, Integral) or x < 0:
        raise ValueError(f"{name} must be a non-negative int or None, got {x!r}")
    return int(x)


@dataclass(frozen=True)
class Layout:
    """Where this rank's slice lies: [start, start + size) of `total` ids, `world` ranks."""
    start: int
    size: int
    total: int
    world: int


class VocabShard:
    """This rank's slice of a vocabulary split over the ranks of `group` (None: the default group).

    start, total: the slice [start, start + V_r) of `total` ids, V_r being the size of the
    vocabulary dimension this rank passes; both None (the default): the slices follow one another
    in rank order, sizes taken from the tensors (uneven shards are fine). Either way every call
    checks on every rank that the slices tile [0, total) (check=True; see the module docs).
    """

    def __init__(self, group=None, start=None, total=None, *, check=True):
        start, total = _int_or_none("start", start), _int_or_none("total", total)
        if (start is None) != (total is None):
            raise ValueError("give VocabShard both start and total, or neither (then the slices follow "
                             "one another in rank order)")
        if total is not None and start > total:
            raise ValueError(f"start={start} lies past total={total}")
        if not isinstance(check, bool):
            raise TypeError(f"check must be a bool, got {check!r}")
        dist = _dist()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("fastkd.distributed.VocabShard needs torch.distributed initialised "
                               "(torch.distributed.init_process_group) before it is made")
        self.group, self.start, self.total, self.check = group, start, total, check
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._layout = None  # from the first agreement
        self._host_ok = _has_cpu_backend(dist, group)  # the agreement on the CPU: no device sync

    def header_device(self) -> torch.device:
        """Where the agreement's small tensors live: the CPU when the group can reduce there."""
        return torch.device("cpu") if self._host_ok else self.device()

    def __repr__(self):
        where = "in rank order" if self.start is None else f"start={self.start}, total={self.total}"
        return f"VocabShard(rank {self.rank} of {self.world}, {where})"

    def device(self) -> torch.device:
        """Where the collectives' tensors live: the current CUDA device for NCCL, else the CPU."""
        if _dist().get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_gather_header(self, own):
        dist = _dist()
        own = own.to(self.header_device())
        out = [torch.empty_like(own) for _ in range(self.world)]
        dist.all_gather(out, own, group=self.group)
        return torch.stack(out).tolist()

    def _raise_everywhere(self, error):
        """Every rank calls this when some rank's header says its call was bad."""
        messages = [None] * self.world
        _dist().all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}",
                                  group=self.group)
        said = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m)
        raise ValueError(f"fastkd vocab-parallel call refused on every rank ({said})") from error

    def fail(self, error):
        """Join the agreement with a bad call of this rank's: raises `error`'s message on every rank."""
        self._all_gather_header(torch.zeros(len(HEADER), dtype=torch.long))
        self._raise_everywhere(error)

    def agree(self, rows: int, size: int, options: tuple, grad: bool, content=()) -> Layout:
        """The agreement (step 0): the same call on every rank, or a ValueError on every rank.
        content: tensors every rank must pass alike (labels [N], sparse-teacher ids [N, k])."""
        if self._layout is not None and not self.check:
            if size != self._layout.size:
                raise ValueError(f"this rank's vocabulary slice changed from {self._layout.size} to {size} "
                                 "columns (VocabShard(check=False) keeps the layout of its first call)")
            self._same_rows(rows)
            return self._layout
        digest = _digest(repr(options).encode())
        own = [1, rows, size, -1 if self.start is None else self.start, -1 if self.total is None else self.total,
               digest, int(grad), _checksum(content)]
        headers = self._all_gather_header(torch.tensor(own, dtype=torch.long))
        if not all(h[0] for h in headers):
            self._raise_everywhere(None)
        layout = self._layout_of(headers)
        self._layout = layout
        return layout

    def _same_rows(self, rows: int):
        """check=False's one collective before the row statistics: (N, -N) all-reduced by MAX, the
        same size on every rank, so a rank with another N is a ValueError on every rank."""
        both = torch.tensor([rows, -rows], dtype=torch.long, device=self.header_device())
        _dist().all_reduce(both, op=_dist().ReduceOp.MAX, group=self.group)
        most, least = int(both[0]), -int(both[1])
        if most != least:
            raise ValueError(f"fastkd vocab-parallel call refused on every rank: the ranks pass different numbers "
                             f"of rows N (from {least} to {most}; this rank {rows}); VocabShard(check=False) checks "
                             "only N after its first call")

    def _layout_of(self, headers) -> Layout:
        """Check the headers (the same on every rank, so every rank decides alike)."""
        col = {name: [h[i] for h in headers] for i, name in enumerate(HEADER)}
        problems = []
        if len(set(col["rows"])) > 1:
            problems.append(f"the ranks pass different numbers of rows N: {col['rows']}")
        if len(set(col["options"])) > 1 or len(set(col["grad"])) > 1:
            problems.append("the ranks call with different options (loss, divergence, temperature, tail, "
                            "reduction, labels, dtype or requires_grad differ)")
        elif len(set(col["rows"])) == 1 and len(set(col["content"])) > 1:
            groups = {}
            for r, c in enumerate(col["content"]):
                groups.setdefault(c, []).append(r)
            problems.append("the ranks pass different labels or sparse-teacher ids (every rank must pass the same "
                            f"rows; ranks alike: {sorted(groups.values())})")
        sizes, starts, totals = col["size"], col["start"], col["total"]
        given = [s >= 0 for s in starts]
        if any(given) and not all(given):
            problems.append("some ranks give VocabShard start/total and others do not")
        elif all(given):
            if len(set(totals)) > 1:
                problems.append(f"the ranks give different totals: {totals}")
            spans = sorted((s, s + v, r) for r, (s, v) in enumerate(zip(starts, sizes)))
            edge = 0
            for s, e, r in spans:
                if s != edge:
                    problems.append(f"rank {r}'s slice [{s}, {e}) ({sizes[r]} columns from start={s}) does not "
                                    f"begin where the previous slice ends ({edge}): the slices must tile "
                                    f"[0, total) without gaps or overlaps")
                    break
                edge = e
            else:
                if edge != totals[0]:
                    problems.append(f"the slices cover [0, {edge}) but total={totals[0]}; a slice's size "
                                    f"disagrees with start/total (sizes {sizes}, starts {starts})")
        if problems:
            raise ValueError("fastkd vocab-parallel call refused on every rank: " + "; ".join(problems))
        if all(given):
            return Layout(starts[self.rank], sizes[self.rank], totals[0], self.world)
        return Layout(sum(sizes[:self.rank]), sizes[self.rank], sum(sizes), self.world)

    def all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        """In place on x (moved to the collectives' device and back when they differ)."""
        dist = _dist()
        here = x if x.device == self.device() else x.to(self.device())
        dist.all_reduce(here, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group)
        if here is not x:
            x.copy_(here)
        return x


def _has_cpu_backend(dist, group) -> bool:
    """Whether `group` reduces CPU tensors (gloo, or torch's default "cpu:gloo,cuda:nccl")."""
    try:
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        pg._get_backend(torch.device("cpu"))
        return True
    except Exception:  # noqa: BLE001 -- no CPU backend (NCCL alone), or an older torch without the lookup
        return dist.get_backend(group) == "gloo"


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=7).digest(), "little")


def _checksum(tensors) -> int:
    """A 56-bit checksum of integer tensors (labels, ids): their sums plain and position-weighted,
    computed where they live and read back (the check=True agreement reads its header anyway)."""
    parts = []
    for x in tensors:
        if x is None:
            parts.append(-1)
            continue
        flat = x.reshape(-1).long()
        weights = (torch.arange(1, flat.numel() + 1, device=flat.device) * 2654435761) % 4294967311
        parts += [flat.numel()] + torch.stack([flat.sum(), (flat * weights).sum()]).tolist()
    return _digest(repr(parts).encode())


def refused(shard, check):
    """Run the local checks `check()`; an error on this rank -- whatever its type -- is raised on every
    rank, naming this rank and the cause, instead of leaving the others waiting in the agreement."""
    try:
        return check()
    except Exception as error:  # noqa: BLE001 -- any error here (an IndexError too) must reach every rank
        shard.fail(error)


def check_shard(vocab_shard):
    if not isinstance(vocab_shard, VocabShard):
        raise TypeError(f"vocab_shard must be a fastkd.distributed.VocabShard, got {type(vocab_shard).__name__}")
    return vocab_shard
