"""Bad input gets a clear error naming the argument and the values; nothing falls back silently."""
import pytest
import torch

import fastkd
from conftest import CPU_BACKENDS, logits

S, T = logits((2, 3, 10)), logits((2, 3, 10), seed=1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(teacher_logits=logits((2, 3, 11))), ValueError, r"student_logits has V=10, teacher_logits has V=11"),
        (dict(teacher_logits=logits((3, 2, 10))), ValueError, r"same leading shape"),
        (dict(teacher_logits=T.double()), TypeError, r"float32 but teacher_logits is torch.float64"),
        (dict(student_logits=torch.ones(2, 3, 10, dtype=torch.long)), TypeError,
         r"student_logits must be a floating-point"),
        (dict(teacher_logits=torch.ones(2, 3, 10, dtype=torch.int32)), TypeError,
         r"teacher_logits must be a floating-point"),
        (dict(student_logits=[1.0, 2.0]), TypeError, r"student_logits must be a torch.Tensor"),
        (dict(student_logits=torch.tensor(1.0), teacher_logits=torch.tensor(1.0)), ValueError, r"vocabulary dimension"),
        (dict(temperature=0.0), ValueError, r"temperature must be positive and finite, got 0.0"),
        (dict(temperature=-1), ValueError, r"temperature must be positive and finite, got -1"),
        (dict(temperature=float("inf")), ValueError, r"temperature must be positive and finite, got inf"),
        (dict(temperature=float("nan")), ValueError, r"temperature must be positive and finite, got nan"),
        (dict(temperature="2"), TypeError, r"temperature must be a real number"),
        (dict(divergence="kl"), ValueError, r"unknown divergence='kl'"),
        (dict(divergence="jsd", beta=0.0), ValueError, r"beta must lie in \(0, 1\) for divergence='jsd', got 0.0"),
        (dict(divergence="jsd", beta=1.0), ValueError, r"beta must lie in \(0, 1\)"),
        (dict(divergence="skew_forward_kl", beta=1.0), ValueError,
         r"beta must lie in \[0, 1\) for divergence='skew_forward_kl'"),
        (dict(divergence="skew_reverse_kl", beta=-0.1), ValueError, r"beta must lie in \[0, 1\)"),
        (dict(beta=float("nan")), ValueError, r"beta must be a finite real number"),
        (dict(reduction="avg"), ValueError, r"unknown reduction='avg'"),
        (dict(hard_weight=0.5), ValueError, r"hard_weight=0.5 needs labels"),
        (dict(hard_weight=1.5, labels=torch.zeros(2, 3, dtype=torch.long)), ValueError,
         r"hard_weight must lie in \[0, 1\], got 1.5"),
        (dict(hard_weight=-0.1), ValueError, r"hard_weight must lie in \[0, 1\], got -0.1"),
        (dict(labels=torch.zeros(6, dtype=torch.long)), ValueError,
         r"labels must have the logits' leading shape \(2, 3\), got \(6,\)"),
        (dict(labels=torch.zeros(2, 3)), TypeError, r"labels must be an integer tensor, got torch.float32"),
        (dict(labels=torch.tensor([[0, 1, 10], [0, 0, 0]])), ValueError,
         r"labels must lie in \[0, 10\) or equal ignore_index=-100; got 10 at row 2"),
        (dict(labels=torch.tensor([[0, 1, -1], [0, 0, 0]])), ValueError, r"got -1 at row 2"),
        (dict(ignore_index=1.5), TypeError, r"ignore_index must be an int"),
        (dict(scale_by_t2="yes"), TypeError, r"scale_by_t2 must be a bool"),
        (dict(backend="gpu"), ValueError, r"backend='gpu' is not available: gpu is unknown"),
    ],
)
def test_bad_input(backend, kwargs, exc, match):
    args = dict(student_logits=S, teacher_logits=T, backend=backend)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fastkd.kd_loss(args.pop("student_logits"), args.pop("teacher_logits"), **args)


def test_devices_differ():
    meta = torch.empty(2, 3, 10, device="meta")
    with pytest.raises(ValueError, match=r"student_logits is on cpu but teacher_logits is on meta"):
        fastkd.kd_loss(S, meta)
    with pytest.raises(ValueError, match=r"labels are on meta but the logits are on cpu"):
        fastkd.kd_loss(S, T, labels=torch.zeros(2, 3, dtype=torch.long, device="meta"))


def test_compiled_cpu_backend_refuses_other_devices():
    if "cpu" not in fastkd.available_backends():
        pytest.skip("fastkd._C not built")
    meta = torch.empty(2, 10, device="meta")
    with pytest.raises(ValueError, match=r"backend='cpu' runs on CPU tensors; the tensors are on meta"):
        fastkd.kd_loss(meta, meta, backend="cpu")


def test_kernel_checks_labels_itself():
    """The C++ op checks label range too (the Python check is skipped under torch.compile)."""
    if "cpu" not in fastkd.available_backends():
        pytest.skip("fastkd._C not built")
    s, t = logits((3, 10)), logits((3, 10), seed=1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\) or equal ignore_index=-100; got 12 at row 1"):
        torch.ops.fastkd.dense_kd(s, t, torch.tensor([0, 12, 3]), "forward_kl", 1.0, 0.5, -100, 0.0, True, 1.0, False)
    with pytest.raises(ValueError, match=r"unknown divergence 'kl'"):
        torch.ops.fastkd.dense_kd(s, t, None, "kl", 1.0, 0.5, -100, 0.0, True, 1.0, False)


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="temperature"):
        fastkd.KDLoss(temperature=0)
    with pytest.raises(ValueError, match="divergence"):
        fastkd.KDLoss(divergence="nope")
    with pytest.raises(ValueError, match="reduction"):
        fastkd.KDLoss(reduction="avg")
