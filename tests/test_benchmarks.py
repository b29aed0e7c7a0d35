"""What the iteration benchmark prints beside its measured ratio: the equal-work bound."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_unet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_iteration import adapted_share, equal_work_bound  # noqa: E402


def test_the_equal_work_bound_is_the_flop_ratio():
    assert equal_work_bound(0.3, 0.3) == pytest.approx(9.8 / 8.6)  # about 1.14x, as BENCHMARKS.md reads
    assert equal_work_bound(1.0, 1.0) == pytest.approx(1.4)  # even with every FLOP in an adapted layer
    assert equal_work_bound(0.0, 0.0) == 1.0


def test_the_adapted_share_counts_the_named_layers():
    net = tiny_unet()
    linears = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    every = adapted_share(net, linears, 8)
    assert 0 < adapted_share(net, linears[:3], 8) < every < 1
    assert adapted_share(net, [], 8) == 0
