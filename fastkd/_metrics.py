"""`fastkd.KDMetrics`: what a fused linear KD call measured on its kept rows, from the chunk of
student logits it already holds (fused_linear_kd_loss(..., return_metrics=True)): no second
GEMM and no second pass over the LM head.

Per kept row (label != ignore_index; every row without labels), at temperature 1 on the student's
logits s as the model makes them (soft-capped, scaled):
- kd_loss: the KD term of docs/math.md, D * T^2 (or D), without the hard-label part;
- ce_loss: logsumexp(s) - s[label] (needs labels);
- top1_agreement: 1 where argmax s is the teacher's most probable id (a dense teacher's argmax; a
  SparseTeacher's entry of largest log-prob -- for a sampled one, its most drawn id), else 0;
- student_entropy: -sum softmax(s) log softmax(s), in nats.
"""
import torch

NAMES = ("kd_loss", "ce_loss", "top1_agreement", "student_entropy")


class KDMetrics:
    """Sums over kept rows (fp64, detached, on the loss's device): `rows` [] and `sums` [4] in the
    order of NAMES; `measured` says which were (ce_loss needs labels; kd_loss is not separable at
    hard_weight=1). `a + b` adds two calls' sums (micro-batches, ranks); `means()` divides."""

    def __init__(self, rows: torch.Tensor, sums: torch.Tensor, measured=(True,) * len(NAMES)):
        self.rows, self.sums, self.measured = rows, sums, tuple(measured)

    def __add__(self, other: "KDMetrics") -> "KDMetrics":
        measured = tuple(a and b for a, b in zip(self.measured, other.measured))
        return KDMetrics(self.rows + other.rows.to(self.rows.device), self.sums + other.sums.to(self.sums.device),
                         measured)

    def means(self) -> dict:
        """{name: mean over the kept rows} of the measured metrics; {} when no row was kept."""
        rows = float(self.rows)
        if rows == 0:
            return {}
        values = (self.sums / rows).tolist()
        return {name: v for name, v, m in zip(NAMES, values, self.measured) if m}

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in self.means().items())
        return f"KDMetrics(rows={int(self.rows)}{', ' + shown if shown else ''})"


class ChunkMetrics:
    """The accumulator of one call's chunk loop: add(z, teacher_top1, labels, row_loss) per chunk."""

    def __init__(self, o, has_labels: bool, device):
        self.o, self.has_labels = o, has_labels
        self.done = False  # set after the first run of the chunk loop: a replayed backward adds nothing
        self.rows = torch.zeros((), dtype=torch.float64, device=device)
        self.sums = torch.zeros(len(NAMES), dtype=torch.float64, device=device)

    def add(self, z, teacher_top1, labels, row_loss):
        """z [n, V] the chunk's student logits; teacher_top1 [n] ids; labels [n] or None; row_loss [n]
        the row op's loss ((1 - w) KD + w CE)."""
        kept = torch.ones(z.shape[0], dtype=torch.bool, device=z.device) if labels is None \
            else labels != self.o.ignore_index
        s = z.float() if z.dtype != torch.float64 else z
        lse = torch.logsumexp(s, -1)
        p = torch.softmax(s, -1)  # (an all -inf row has no distribution: NaN here, kept out below)
        entropy = torch.where(lse == float("-inf"), 0.0, -torch.special.xlogy(p, p).sum(-1))
        agree = (s.argmax(-1) == teacher_top1).to(s.dtype)
        w = self.o.hard_weight
        if self.has_labels:
            ce = lse - s.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            ce = torch.where(kept, ce, 0.0)
        else:
            ce = torch.zeros_like(lse)
        kd = (row_loss.to(s.dtype) - w * ce) / (1 - w) if w < 1 else torch.zeros_like(lse)
        per_row = torch.stack([kd, ce, agree, entropy], -1)
        self.sums += torch.where(kept.unsqueeze(-1), per_row, 0.0).sum(0, dtype=torch.float64)
        self.rows += kept.sum()

    def result(self) -> KDMetrics:
        return KDMetrics(self.rows, self.sums, (self.o.hard_weight < 1, self.has_labels, True, True))
