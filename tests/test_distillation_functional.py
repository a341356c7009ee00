"""The pure-torch core of distillation: losses, projection, schedule (no Trainer)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_slim.distillation import functional as kd


def test_soft_target_loss_is_hinton_kl_times_t_squared():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    T = 3.0
    p_t = torch.softmax(t / T, -1)
    expected = (p_t * (p_t.log() - torch.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    # the same KL formula computed two ways in float32 over 10 classes x 8 rows: a few ulps; assert_close's float32
    # defaults (rtol 1.3e-6, atol 1e-5) hold on any CPU. KL(t, t) = 0 up to the rounding of log_softmax (eps * |logit|,
    # ~1e-7 per term) times T^2 = 9: abs=1e-6 leaves room
    torch.testing.assert_close(kd.soft_target_loss(s, t, T), expected)
    assert float(kd.soft_target_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)
    # leading dimensions (tokens) count as examples
    torch.testing.assert_close(kd.soft_target_loss(s.view(2, 4, 10), t.view(2, 4, 10), T), expected)
    with pytest.raises(ValueError, match=r"\(8, 10\).*\(8, 5\)"):
        kd.soft_target_loss(s, t[:, :5])


def test_soft_target_gradient_does_not_reach_the_teacher():
    s, t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10, requires_grad=True)
    kd.soft_target_loss(s, t, 2.0).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_agreement_and_feature_losses():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    t = torch.tensor([[2.0, 0.0], [2.0, 0.0], [3.0, 1.0]])
    # 2 of 3 argmaxes agree: an exact ratio, approx only absorbs 2/3's float rounding
    assert float(kd.agreement(s, t)) == pytest.approx(2 / 3)
    a, b = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    # MSE over 60 elements, two summation orders: a few ulps, inside the float32 defaults. The cosine of parallel /
    # opposite vectors is +-1 up to float32 normalisation over 15-element vectors (~1e-7): abs=1e-6
    torch.testing.assert_close(kd.feature_loss(a, b, "mse"), F.mse_loss(a, b))
    assert float(kd.feature_loss(a, 2 * a, "cosine")) == pytest.approx(0.0, abs=1e-6)
    assert float(kd.feature_loss(a, -a, "cosine")) == pytest.approx(2.0, abs=1e-6)
    with pytest.raises(ValueError, match="'l1' is not one of"):
        kd.feature_loss(a, b, "l1")


def test_projection_maps_the_width_dimension_with_its_own_generator():
    state = torch.random.get_rng_state()
    p1 = kd.Projection(16, 32, dim=1, generator=torch.Generator().manual_seed(0))
    p2 = kd.Projection(16, 32, dim=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched: resumes stay exact
    # the same generator seed draws the same weights (bit-equal on any CPU: torch's CPU RNG is not vectorised
    # differently by ISA); default tolerance only for brevity
    torch.testing.assert_close(p1.linear.weight, p2.linear.weight)
    assert p1(torch.randn(4, 16, 5)).shape == (4, 32, 5)
    assert kd.Projection(8, 4, dim=-1)(torch.randn(2, 7, 8)).shape == (2, 7, 4)


def test_linear_schedule():
    assert kd.linear_schedule(0, 10, 20, 1.0, 0.0) == 1.0
    # halfway through 10 -> 20: float64 arithmetic on small integers, 0.5 up to rounding
    assert kd.linear_schedule(15, 10, 20, 1.0, 0.0) == pytest.approx(0.5)
    assert kd.linear_schedule(99, 10, 20, 1.0, 0.0) == 0.0
    assert kd.linear_schedule(99, 10, 20, 4.0, None) == 4.0
