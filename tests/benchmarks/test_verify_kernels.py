"""benchmarks/verify_kernels.py's distances between two runs, against NumPy in float64."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def verify_kernels():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling _common
    try:
        spec = importlib.util.spec_from_file_location("verify_kernels_under_test", BENCH / "verify_kernels.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


def _long_gradients(n=8_000_000):
    """Gradient-like fp32 vectors as long as a 1B model's LoRA gradient, one all-positive (a dot product of
    same-sign terms is where fp32 accumulation drifts most)."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(n, generator=g).abs() * 1e-3
    run = ref + torch.randn(n, generator=g) * 4e-5
    return ref, run


def test_distances_match_float64_numpy(verify_kernels):
    ref, run = _long_gradients()
    out = verify_kernels.compare({"losses": [2.0, -4.0], "grads": [ref]}, {"losses": [2.01, -4.0], "grads": [run]})
    r, x = ref.numpy().astype(np.float64), run.numpy().astype(np.float64)
    assert out["min_grad_cosine"] == pytest.approx(r @ x / (np.linalg.norm(r) * np.linalg.norm(x)), abs=1e-12)
    assert out["max_grad_rel_l2"] == pytest.approx(np.linalg.norm(x - r) / np.linalg.norm(r), rel=1e-9)
    assert out["max_loss_rel_diff"] == pytest.approx(0.01 / 2.0)


def test_identical_gradients_give_a_cosine_of_one(verify_kernels):
    ref, _ = _long_gradients()
    out = verify_kernels.compare({"losses": [1.0], "grads": [ref]}, {"losses": [1.0], "grads": [ref.clone()]})
    assert out["min_grad_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert out["max_grad_rel_l2"] == 0.0
    # the control: torch's fp32 cosine of the same vector with itself, the form compare used before
    assert abs(float(torch.nn.functional.cosine_similarity(ref, ref, dim=0)) - 1.0) > 1e-5


def test_the_worst_step_is_reported(verify_kernels):
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([1.0, 1.0, 0.0])  # 45 degrees from a
    out = verify_kernels.compare({"losses": [1.0, 1.0], "grads": [a, a]}, {"losses": [1.0, 1.0], "grads": [a, b]})
    assert out["min_grad_cosine"] == pytest.approx(2**-0.5)
    assert out["max_grad_rel_l2"] == pytest.approx(1.0)
