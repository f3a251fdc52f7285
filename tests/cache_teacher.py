"""A deterministic toy teacher for the `python -m fastkd cache` tests: ids [B, L] -> logits [B, L, V].

FASTKD_TEST_KILL_AFTER=n makes the process SIGKILL itself on its n-th call (a killed writer);
FASTKD_TEST_INTERRUPT_AFTER=n sends it SIGINT instead (Ctrl-C)."""
import os
import signal

import torch

VOCAB = 1000
_W = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0)) * 3.0
_calls = 0


def teacher(ids: torch.Tensor) -> torch.Tensor:
    global _calls
    _calls += 1
    if _calls == int(os.environ.get("FASTKD_TEST_KILL_AFTER", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    if _calls == int(os.environ.get("FASTKD_TEST_INTERRUPT_AFTER", "0")):
        os.kill(os.getpid(), signal.SIGINT)
    context = _W[ids].cumsum(1) / torch.arange(1, ids.shape[1] + 1).view(1, -1, 1)
    return _W[ids] + 0.5 * context


def not_logits(ids: torch.Tensor) -> torch.Tensor:
    """A wrong teacher: returns the ids themselves."""
    return ids


def nan_teacher(ids: torch.Tensor) -> torch.Tensor:
    """Overflows like an fp16 teacher would: a NaN at batch position (0, 3) of its second call."""
    global _calls
    _calls += 1
    out = _W[ids].clone()
    if _calls == 2:
        out[0, 3, 7] = float("nan")
    return out


def shrinking_teacher(ids: torch.Tensor) -> torch.Tensor:
    """A teacher whose vocabulary changes after its first calls (V = 1000, then 999)."""
    global _calls
    _calls += 1
    return _W[ids] if _calls <= 2 else _W[ids][..., :999]


def no_vocab(ids: torch.Tensor) -> torch.Tensor:
    return torch.zeros(ids.shape + (0,))
