"""Each method's mathematics against answers known in closed form.

Gaussian data make the linear interpolant's velocity field and flow map analytic: for
``a ~ N(mu, sig^2)`` per element and ``x_t = (1 - t) a + t z``, the marginal at time t is
``N(m_t, S_t^2)`` with ``m_t = (1 - t) mu`` and ``S_t^2 = (1 - t)^2 sig^2 + t^2``, and the flow map
is the monotone affine map between two marginals, ``X_{t->s}(x) = m_s + S_s / S_t (x - m_t)``.
:class:`ExactFlowMap` is that map as a network ``F(x, t, s) = (x - X_{t->s}(x)) / (t - s)``
(the instantaneous velocity on the diagonal). Plugged into a method's loss it gives what the
method's equations say it must, to float64 precision (or to the finite difference's error):

- iSD: the self-distillation term vanishes, the flow-matching term is ``|v* - (z - a)|^2``, the
  time derivative equals ``(v* - F) / (t - s)``, the gradient flows through the two student passes
  only (checked against the loss written out from METHOD.md);
- MeanFlow: the per-sample residual is ``-(S_s / S_t) (v - v*)`` (its target is linear in the
  conditional velocity ``v``, whose conditional mean is ``v*``);
- flow matching and DDPM: an oracle that knows the clean chunk predicts the target exactly, so
  the loss is zero only for the right target and noising (DDPM's alphas written out by hand);
- iCT: the consistency function is the identity at sigma_min, the loss is the one of the paper;
- samplers: one and several jumps of the exact flow map land on ``mu + sig z``; Euler on the
  exact velocity follows the hand-written grid from t = 1 to t = 0.

Every test here was seen to fail on a deliberate mistake in the method it pins (the list and the
test that caught each: ``python tests/mutations.py``, run by the suite in test_mutations.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cm_policy.methods import make_method
from cm_policy.methods.base import adaptive_weighted

MU, SIG = 0.1, 0.3
B, H, D = 64, 4, 2
DT = torch.float64


def m(t: torch.Tensor) -> torch.Tensor:
    return (1 - t) * MU


def std(t: torch.Tensor) -> torch.Tensor:
    return ((1 - t) ** 2 * SIG**2 + t**2).sqrt()


def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v*(x, t) = E[z - a | x_t = x] = dm/dt + (dS/dt / S) (x - m)."""
    dstd = (t - (1 - t) * SIG**2) / std(t)
    return -MU + dstd / std(t) * (x - m(t))


def flow_map(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return m(s) + std(s) / std(t) * (x - m(t))


class ExactFlowMap(nn.Module):
    """The exact average velocity of the Gaussian's flow map, ``F(x, t, s, cond)``."""

    def forward(self, x, t, s, cond):
        t, s = t.view(-1, 1, 1).to(x), s.view(-1, 1, 1).to(x)
        gap = t - s
        safe = torch.where(gap.abs() < 1e-9, torch.ones_like(gap), gap)
        jump = (x - flow_map(x, t, s)) / safe
        return torch.where(gap.abs() < 1e-9, velocity(x, t), jump)


class Perturbed(nn.Module):
    """The exact map plus a small learnable perturbation of every input: a network whose
    gradients can be checked against a hand-written loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.w = nn.Parameter(0.3 * torch.randn(4, dtype=DT))
        self.exact = ExactFlowMap()

    def forward(self, x, t, s, cond):
        tb, sb = t.view(-1, 1, 1).to(x), s.view(-1, 1, 1).to(x)
        w = self.w
        return self.exact(x, t, s, cond) + w[0] * torch.tanh(x) + w[1] * tb + w[2] * sb * x + w[3]


def gaussian_chunks(seed: int = 0, batch: int = B) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MU + SIG * torch.randn(batch, H, D, generator=g, dtype=DT)


def fixed_times(batch: int = B, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """t in (0.1, 1], s at least 0.05 below it (a few rows with s = t, the diagonal)."""
    g = torch.Generator().manual_seed(seed)
    t = 0.1 + 0.9 * torch.rand(batch, generator=g, dtype=DT)
    s = (t - 0.05) * torch.rand(batch, generator=g, dtype=DT)
    s[:4] = t[:4]
    return t, s


def with_times(method, t: torch.Tensor, s: torch.Tensor):
    """The method with its time draw replaced by ``(t, s)``; the noise is the next draw."""
    method.sample_times = lambda batch, device: (t, s)
    return method


def drawn_noise(actions: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn_like(actions)


COND = torch.zeros(B, 3, dtype=DT)


# --- iSD -------------------------------------------------------------------------------------


@pytest.mark.parametrize("derivative", ["finite_difference", "jvp"])
@pytest.mark.parametrize("batch_passes", [True, False])
def test_isd_self_distillation_vanishes_at_the_exact_flow_map(derivative, batch_passes):
    t, s = fixed_times()
    method = with_times(make_method("isd", derivative=derivative, batch_passes=batch_passes), t, s)
    a = gaussian_chunks()
    torch.manual_seed(3)
    _, logs = method.loss(ExactFlowMap(), a, COND)
    z = drawn_noise(a, 3)
    x_t = (1 - t.view(-1, 1, 1)) * a + t.view(-1, 1, 1) * z
    # The flow-matching term: the exact velocity against the conditional one, to float64.
    expected_fm = (velocity(x_t, t.view(-1, 1, 1)) - (z - a)).pow(2).mean()
    assert logs["loss_fm"].item() == pytest.approx(expected_fm.item(), rel=1e-10)
    # The self-distillation term vanishes up to the derivative's error; a wrong target (the
    # sign of its derivative term flipped) would leave (2 (t - s) D)^2, far above the bound.
    exact = ExactFlowMap()(x_t, t, s, COND)
    d_true = (velocity(x_t, t.view(-1, 1, 1)) - exact)[4:] / (t - s)[4:].view(-1, 1, 1)
    wrong = (2 * (t - s)[4:].view(-1, 1, 1) * d_true).pow(2).mean().item()
    bound = 1e-20 if derivative == "jvp" else 1e-9
    assert wrong > 1e-3
    assert logs["loss_sd"].item() < bound


@pytest.mark.parametrize("derivative", ["finite_difference", "jvp"])
def test_isd_time_derivative_is_the_total_derivative_along_the_flow(derivative):
    """D = dF/dx v* + dF/dt at fixed s; for the exact map F = v* - (t - s) D, so D is known."""
    t, s = fixed_times()
    t, s = t[4:], s[4:]
    method = make_method("isd", derivative=derivative)
    x = MU + torch.randn(len(t), H, D, dtype=DT, generator=torch.Generator().manual_seed(2))
    v = velocity(x, t.view(-1, 1, 1))
    d = method.time_derivative(ExactFlowMap(), x, t, s, COND[: len(t)], v)
    expected = (v - ExactFlowMap()(x, t, s, None)) / (t - s).view(-1, 1, 1)
    # The central difference's error is O(fd_eps^2) relative.
    tol = 1e-12 if derivative == "jvp" else 1e-3
    assert ((d - expected).abs() / (expected.abs() + 1)).max().item() < tol


def isd_loss_from_method_md(model, method, a, t, s, z):
    """METHOD.md's training step, written out: the reference for values and gradients."""
    tb = t.view(-1, 1, 1)
    x_t = (1 - tb) * a + tb * z
    f_diag = model(x_t, t, t, COND)
    f_jump = model(x_t, t, s, COND)
    with torch.no_grad():
        v_hat = model(x_t, t, t, COND)
        eps = method.fd_eps
        d = (
            model(x_t + eps * v_hat, t + eps, s, COND) - model(x_t - eps * v_hat, t - eps, s, COND)
        ) / (2 * eps)
        target = v_hat - (t - s).view(-1, 1, 1) * d
    per_sample = (f_diag - (z - a)).pow(2).flatten(1).mean(1) + (f_jump - target).pow(2).flatten(
        1
    ).mean(1)
    return (per_sample / (per_sample.detach() + method.adaptive_c) ** method.adaptive_p).mean()


@pytest.mark.parametrize("batch_passes", [True, False])
def test_isd_gradient_flows_only_through_the_two_student_passes(batch_passes):
    """The teacher velocity, the derivative and the adaptive weight are under stop-gradient:
    the gradient equals the one of the loss written out from METHOD.md."""
    t, s = fixed_times()
    method = with_times(make_method("isd", batch_passes=batch_passes), t, s)
    a = gaussian_chunks()
    model = Perturbed()
    torch.manual_seed(3)
    loss, _ = method.loss(model, a, COND)
    (grad,) = torch.autograd.grad(loss, model.w)
    reference = isd_loss_from_method_md(model, method, a, t, s, drawn_noise(a, 3))
    (expected,) = torch.autograd.grad(reference, model.w)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-9)
    assert torch.allclose(grad, expected, rtol=1e-7, atol=1e-12), (grad, expected)


def test_isd_times_are_ordered_beta_draws():
    method = make_method("isd")
    torch.manual_seed(0)
    t, s = method.sample_times(20000, torch.device("cpu"))
    assert (t >= s).all()
    # The max of two Beta(0.8, 1) draws has CDF F(u)^2 = u^1.6: E[t] = 1.6 / 2.6.
    assert t.mean().item() == pytest.approx(1.6 / 2.6, abs=0.01)


# --- MeanFlow --------------------------------------------------------------------------------


def test_meanflow_residual_is_the_conditional_velocity_noise_scaled_by_the_flow_map():
    """T = v - (t - s)(dF/dx v + dF/dt) is linear in v and equals F* at v = v*, so the exact map's
    residual is F* - T = -(1 - (t - s) dF/dx)(v - v*) = -(S_s / S_t)(v - v*) per element."""
    t, s = fixed_times()
    method = with_times(make_method("meanflow"), t, s)
    a = gaussian_chunks()
    torch.manual_seed(4)
    _, logs = method.loss(ExactFlowMap(), a, COND)
    z = drawn_noise(a, 4)
    tb, sb = t.view(-1, 1, 1), s.view(-1, 1, 1)
    x_t = (1 - tb) * a + tb * z
    residual = std(sb) / std(tb) * ((z - a) - velocity(x_t, tb))
    assert logs["loss_mf"].item() == pytest.approx(residual.pow(2).mean().item(), rel=1e-9)


def test_meanflow_weight_divides_by_the_stopped_loss():
    t, s = fixed_times()
    method = with_times(make_method("meanflow"), t, s)
    a, model = gaussian_chunks(), Perturbed()
    torch.manual_seed(4)
    loss, _ = method.loss(model, a, COND)
    (grad,) = torch.autograd.grad(loss, model.w)
    z = drawn_noise(a, 4)
    tb = t.view(-1, 1, 1)
    x_t, v = (1 - tb) * a + tb * z, z - a
    with torch.no_grad():
        _, dfdt = torch.func.jvp(
            lambda x_, t_: model(x_, t_, s, COND), (x_t, t), (v, torch.ones_like(t))
        )
        target = v - (t - s).view(-1, 1, 1) * dfdt
    per = (model(x_t, t, s, COND) - target).pow(2).flatten(1).mean(1)
    reference = (per / (per.detach() + method.adaptive_c) ** method.adaptive_p).mean()
    (expected,) = torch.autograd.grad(reference, model.w)
    assert torch.allclose(grad, expected, rtol=1e-7, atol=1e-12)


# --- flow matching and DDPM: an oracle that knows the clean chunk ----------------------------


class FlowOracle(nn.Module):
    """Knows the clean chunk ``a``: reads z off ``x_t = (1 - t) a + t z`` and returns z - a."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, x, t, s, cond):
        tb = t.view(-1, 1, 1).to(x)
        z = (x - (1 - tb) * self.a) / tb
        return z - self.a


def test_flow_matching_target_is_the_conditional_velocity():
    a = gaussian_chunks()
    loss, logs = make_method("flow").loss(FlowOracle(a), a, COND)
    assert loss.item() < 1e-12 and logs["loss_fm"].item() < 1e-12
    # ... and a network that predicts anything else is penalised by its squared error.
    off = FlowOracle(a)
    loss_off, _ = make_method("flow").loss(lambda x, t, s, c: off(x, t, s, c) + 0.1, a, COND)
    assert loss_off.item() == pytest.approx(0.01, rel=1e-6)


def squaredcos_alphas_cumprod(n: int) -> torch.Tensor:
    """Diffusion Policy's squaredcos_cap_v2 schedule written out (Nichol & Dhariwal 2021)."""

    def f(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)]
    return torch.tensor([math.prod(1 - b for b in betas[: k + 1]) for k in range(n)], dtype=DT)


class EpsOracle(nn.Module):
    """Knows the clean chunk: reads the noise off ``x_k = sqrt(ab_k) a + sqrt(1 - ab_k) eps``,
    with the timestep k recovered from the network's time input k / 100."""

    def __init__(self, a, n: int = 100):
        super().__init__()
        self.a, self.n = a, n
        self.alphas = squaredcos_alphas_cumprod(n)

    def forward(self, x, t, s, cond):
        k = torch.round(t * self.n).long()
        ab = self.alphas[k].view(-1, 1, 1).to(x)
        return (x - ab.sqrt() * self.a) / (1 - ab).sqrt()


def test_ddpm_predicts_the_noise_of_the_cosine_schedule():
    a = gaussian_chunks()
    method = make_method("ddpm")
    torch.manual_seed(0)
    loss, _ = method.loss(EpsOracle(a), a, COND)
    assert loss.item() < 1e-10
    assert torch.allclose(
        method.train_scheduler.alphas_cumprod.to(DT), squaredcos_alphas_cumprod(100), atol=1e-6
    )


# --- iCT -------------------------------------------------------------------------------------


def test_ict_consistency_function_is_the_identity_at_sigma_min():
    method = make_method("ict")
    x = gaussian_chunks()
    sigma = torch.full((B,), method.sigma_min, dtype=DT)
    out = method.consistency(lambda x_, t, s, c: torch.full_like(x_, 7.0), x, sigma, COND)
    assert torch.allclose(out, x, atol=1e-12)


def test_ict_loss_compares_adjacent_levels_with_the_same_noise():
    """The student at the higher level against the stopped output at the next lower level, the
    same z, pseudo-Huber, weighted by 1 / (sigma_hi - sigma_lo) (iCT, arXiv 2310.14189)."""
    method, model, a = make_method("ict"), Perturbed(), gaussian_chunks()
    method.set_progress(0, 1000)
    torch.manual_seed(6)
    loss, _ = method.loss(model, a, COND)
    (grad,) = torch.autograd.grad(loss, model.w)
    torch.manual_seed(6)
    n = method.s0 + 1  # the first stage of the curriculum
    ramp = torch.linspace(0, 1, n, dtype=DT)
    rho = method.rho
    sigmas = (
        method.sigma_min ** (1 / rho)
        + ramp * (method.sigma_max ** (1 / rho) - method.sigma_min ** (1 / rho))
    ) ** rho
    cdf = torch.erf((sigmas.log() - method.p_mean) / (math.sqrt(2) * method.p_std))
    i = torch.multinomial((cdf[1:] - cdf[:-1]).clamp_min(0).float(), B, replacement=True)
    lo, hi = sigmas[i], sigmas[i + 1]
    z = torch.randn_like(a)
    pred = method.consistency(model, a + hi.view(-1, 1, 1) * z, hi, COND)
    with torch.no_grad():
        target = method.consistency(model, a + lo.view(-1, 1, 1) * z, lo, COND)
    c = method.huber_scale * math.sqrt(H * D)
    huber = ((pred - target).pow(2).flatten(1).sum(1) + c**2).sqrt() - c
    reference = (huber / (hi - lo)).mean()
    (expected,) = torch.autograd.grad(reference, model.w)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-9)
    assert torch.allclose(grad, expected, rtol=1e-7, atol=1e-12)


# --- samplers --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["isd", "meanflow"])
@pytest.mark.parametrize("steps", [1, 3])
def test_flow_map_jumps_land_on_the_data_distribution(name, steps):
    """One jump, or several on the grid 1 -> 0, of the exact flow map: X_{1->0}(z) = mu + sig z."""
    z = torch.randn(B, H, D, dtype=DT, generator=torch.Generator().manual_seed(8))
    out = make_method(name).sample(ExactFlowMap(), COND, (B, H, D), steps=steps, z=z)
    assert torch.allclose(out, (MU + SIG * z).clamp(-1, 1), atol=1e-10)


def test_flow_euler_steps_follow_the_grid_from_noise_to_data():
    z = torch.randn(B, H, D, dtype=DT, generator=torch.Generator().manual_seed(9))
    method = make_method("flow")
    out = method.sample(ExactFlowMap(), COND, (B, H, D), steps=4, z=z)
    x = z
    for k in range(4):
        t = torch.tensor(1 - k / 4, dtype=DT)
        x = x - 0.25 * velocity(x, t)
    assert torch.allclose(out, x.clamp(-1, 1), atol=1e-10)
    # Many Euler steps on the exact velocity converge to the exact flow map.
    fine = method.sample(ExactFlowMap(), COND, (B, H, D), steps=1000, z=z)
    assert (fine - (MU + SIG * z).clamp(-1, 1)).abs().max().item() < 2.5e-3


def test_isd_loss_terms_sum_into_the_adaptive_weight():
    per = torch.tensor([0.0, 0.5, 2.0], dtype=DT, requires_grad=True)
    loss = adaptive_weighted(per, 0.01, 1.0)
    (grad,) = torch.autograd.grad(loss, per)
    assert loss.item() == pytest.approx((per / (per + 0.01)).mean().item())
    assert torch.allclose(grad, 1 / (per.detach() + 0.01) / 3)
