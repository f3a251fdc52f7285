"""The loss options: one frozen object, built and checked once per call (or once per module), that
every loss layer keeps -- kd_loss, sparse_kd_loss, fused_linear_kd_loss, the vocab-parallel path
and the nn.Module twins. Each error names the option and its value.

Also the sparse teacher's container (`SparseTeacher`, public as fastkd.SparseTeacher), defined
here, below every loss, so each layer can check a teacher without importing the layer above it.
"""
import dataclasses
import math
from numbers import Real
from typing import NamedTuple

import torch

from ._math import DIVERGENCES, TAILS

REDUCTIONS = ("mean", "sum", "none")
KINDS = ("topk", "sampled")


class SparseTeacher(NamedTuple):
    """indices [..., k] int64 token ids; logprobs [..., k] float32 log p_T of them (-inf marks
    padding); tail_logmass [...] float32 log of p_T's mass outside `indices` (-inf: none);
    temperature: the T of p_T; kind: "topk" or "sampled"."""

    indices: torch.Tensor
    logprobs: torch.Tensor
    tail_logmass: torch.Tensor
    temperature: float
    kind: str


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """The options of one loss call, checked. temperature is None for a sparse teacher until
    `with_teacher` sets the teacher's own; tail is used by sparse teachers only."""

    temperature: float | None
    divergence: str
    beta: float
    reduction: str
    ignore_index: int
    hard_weight: float
    scale_by_t2: bool
    vocab_size: int | None
    backend: str
    tail: str = "bucket"

    def key(self) -> tuple:
        """Every field, in order: what the ranks of a vocab-parallel call must agree on."""
        return dataclasses.astuple(self)

    def describe(self, exclude=()) -> str:
        """name=value, ... of the fields (an nn.Module's extra_repr)."""
        fields = [f.name for f in dataclasses.fields(self) if f.name not in exclude]
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in fields)


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return float(temperature)


def _beta(divergence, beta) -> float:
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence={divergence!r}; expected one of {DIVERGENCES}")
    if isinstance(beta, bool) or not isinstance(beta, Real) or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite real number, got {beta!r}")
    if divergence == "jsd" and not 0 < beta < 1:
        raise ValueError(f"beta must lie in (0, 1) for divergence='jsd', got {beta}")
    if divergence.startswith("skew_") and not 0 <= beta < 1:
        raise ValueError(f"beta must lie in [0, 1) for divergence={divergence!r}, got {beta}")
    return float(beta)


def check_vocab_size(vocab_size) -> int | None:
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
        raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")
    return vocab_size


def loss_options(*, temperature=1.0, divergence="forward_kl", beta=0.5, reduction="mean", ignore_index=-100,
                 hard_weight=0.0, scale_by_t2=True, vocab_size=None, backend="auto", tail="bucket",
                 sparse=False) -> LossOptions:
    """The checked options. sparse: a sparse teacher's call (temperature None is then the teacher's,
    and only forward KL is defined); the tail is resolved against the teacher by with_teacher."""
    if sparse:
        if divergence != "forward_kl":
            raise ValueError(f"divergence={divergence!r}: a sparse teacher supports only 'forward_kl' "
                             "(the other divergences need the teacher's full distribution)")
        if tail not in TAILS:
            raise ValueError(f"unknown tail={tail!r}; expected one of {TAILS}")
    beta = _beta(divergence, beta)
    temperature = None if temperature is None and sparse else check_temperature(temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction={reduction!r}; expected one of {REDUCTIONS}")
    if isinstance(hard_weight, bool) or not isinstance(hard_weight, Real) or not 0 <= hard_weight <= 1:
        raise ValueError(f"hard_weight must lie in [0, 1], got {hard_weight!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(scale_by_t2, bool):
        raise TypeError(f"scale_by_t2 must be a bool, got {scale_by_t2!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str such as 'auto', got {backend!r}")
    return LossOptions(temperature, divergence, beta, reduction, ignore_index, float(hard_weight), scale_by_t2,
                       check_vocab_size(vocab_size), backend, tail)


def as_options(options) -> LossOptions:
    """A call's options as the layers below take them: a LossOptions as it is (a module's, checked at
    its construction), or the keyword arguments of loss_options, checked here -- inside the
    vocab-parallel guard when the call is sharded, so a bad option on one rank is an error on every
    rank."""
    if isinstance(options, LossOptions):
        return options
    if not isinstance(options, dict):
        raise TypeError(f"options must be a LossOptions or a dict of loss_options' arguments, got "
                        f"{type(options).__name__}")
    return loss_options(**options)


def with_teacher(options: LossOptions, teacher: SparseTeacher) -> LossOptions:
    """The options of a sparse teacher's call: its temperature (a requested one must be the same)
    and the tail to run (a sampled teacher always uses renorm_teacher, its unbiased estimator)."""
    t = check_temperature(teacher.temperature)
    if options.temperature is not None and options.temperature != t:
        raise ValueError(f"temperature={options.temperature} differs from the teacher's temperature={t}: a "
                         "sparse teacher's tempered distribution is fixed when it is compressed; rebuild the "
                         "teacher at the temperature you want")
    tail = options.tail
    if teacher.kind == "sampled":
        if tail == "renorm_both":
            raise ValueError("tail='renorm_both' is biased for a sampled teacher; sampled KD uses 'renorm_teacher'")
        tail = "renorm_teacher"
    return dataclasses.replace(options, temperature=t, tail=tail)
