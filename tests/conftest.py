"""Test set-up. Must run before any Triton kernel is defined: on a machine without a CUDA
GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1), with tiny grids."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    """rms(ref - out) / rms(ref), in float64; the error measure used by every kernel test."""
    ref = ref.detach().double()
    out = out.detach().double()
    assert ref.shape == out.shape, (ref.shape, out.shape)
    assert torch.isfinite(out).all(), "non-finite output"
    den = ref.pow(2).mean().sqrt().clamp_min(1e-30)
    return float((ref - out).pow(2).mean().sqrt() / den)


@pytest.fixture(autouse=True)
def _kernels_stay_in_bounds():
    """Under the interpreter every Triton launch of a test is bounds-checked (tests/kernels/bounds.py):
    a load or store outside the launch's tensors fails the test that made it, whatever it asserts
    (a fault inside a test's own bounds_checked block is that block's: tests/kernels/test_bounds.py)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from tests.kernels.bounds import bounds_checked
    with bounds_checked() as report:
        yield
    assert not report.faults, f"out-of-bounds accesses (kernel, kind, lanes, first address): {report.faults[:5]}"


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, whatever ran before it: a test that draws
    random data without seeding is still deterministic (a flaky test is a defect)."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def rel_err():
    return rel_rms


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.fail("gpu test selected on a machine without CUDA; run with -m gpu on a GPU")
    return torch.device("cuda")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds barrier waits (badly so on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
