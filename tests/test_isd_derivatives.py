"""iSD's four ways to the total time derivative D = dF/dx v_hat + dF/dt (at fixed s), against the
exact Gaussian flow map of test_method_math.py.

- ``finite_difference`` (central, the default): O(eps^2) error;
- ``finite_difference_one_sided``: (F(x + eps v, t + eps, s) - F(x, t, s)) / eps with the jump
  pass (detached) as its centre: one no-grad forward fewer, O(eps) error;
- ``jvp``: a no-grad forward-mode JVP, exact;
- ``jvp_primal``: one forward-mode pass whose primal output is the jump, with gradient, and whose
  tangent is D, without: one forward fewer than ``jvp``, the same loss and gradient.

Each test here was seen to fail on a deliberate mistake in the code it pins (tests/mutations.py).
"""

from __future__ import annotations

import pytest
import torch
from test_method_math import (
    COND,
    DT,
    MU,
    ExactFlowMap,
    Perturbed,
    drawn_noise,
    fixed_times,
    gaussian_chunks,
    velocity,
    with_times,
)
from torch import nn

from cm_policy.methods import make_method
from cm_policy.methods.isd import DERIVATIVES
from cm_policy.models.unet import ConditionalUnet1D

H, D = 4, 2
EXACT = ("jvp", "jvp_primal")


def off_diagonal_point(seed: int = 2):
    """Times with s at least 0.05 below t, a point x and the exact velocity there."""
    t, s = fixed_times()
    t, s = t[4:], s[4:]
    x = MU + torch.randn(len(t), H, D, dtype=DT, generator=torch.Generator().manual_seed(seed))
    return x, t, s, velocity(x, t.view(-1, 1, 1))


def analytic_derivative(x, t, s, v):
    """For the exact map F = v* - (t - s) D, so D = (v* - F) / (t - s)."""
    return (v - ExactFlowMap()(x, t, s, None)) / (t - s).view(-1, 1, 1)


def relative_error(d, expected) -> float:
    return ((d - expected).abs() / (expected.abs() + 1)).max().item()


def test_derivative_names_are_the_four_options_and_others_are_refused():
    assert DERIVATIVES == ("finite_difference", "finite_difference_one_sided", "jvp", "jvp_primal")
    assert make_method("isd").derivative == "finite_difference"  # the YAML default is unchanged
    with pytest.raises(ValueError, match="finite_difference_one_sided, jvp, jvp_primal"):
        make_method("isd", derivative="one_sided")


@pytest.mark.parametrize("derivative", DERIVATIVES)
@pytest.mark.parametrize("batch_passes", [True, False])
def test_time_derivative_against_the_analytic_one(derivative, batch_passes):
    x, t, s, v = off_diagonal_point()
    expected = analytic_derivative(x, t, s, v)
    method = make_method("isd", derivative=derivative, batch_passes=batch_passes)
    d = method.time_derivative(ExactFlowMap(), x, t, s, COND[: len(t)], v)
    if derivative in EXACT:
        assert relative_error(d, expected) < 1e-12
        return
    # A finite difference's error shrinks as eps^order: halving eps divides it by 2^order (at
    # fd_eps 0.005 the one-sided error is about 1e-2 relative, the central one about 1e-4).
    order = 1 if derivative == "finite_difference_one_sided" else 2
    err = relative_error(d, expected)
    half = make_method("isd", derivative=derivative, batch_passes=batch_passes, fd_eps=0.0025)
    d_half = half.time_derivative(ExactFlowMap(), x, t, s, COND[: len(t)], v)
    err_half = relative_error(d_half, expected)
    assert err < (3e-2 if order == 1 else 1e-3)
    assert err / err_half == pytest.approx(2**order, rel=0.1), (err, err_half)


def test_one_sided_difference_reuses_the_given_centre():
    """The jump F(x, t, s) handed in as the centre replaces its evaluation: same D, one
    evaluation of F fewer (and a different centre gives a different D)."""
    x, t, s, v = off_diagonal_point()
    method = make_method("isd", derivative="finite_difference_one_sided")
    exact = ExactFlowMap()
    own = method.time_derivative(exact, x, t, s, COND[: len(t)], v)
    centre = exact(x, t, s, None)
    counting = Counting(exact)
    given = method.time_derivative(counting, x, t, s, COND[: len(t)], v, centre=centre)
    torch.testing.assert_close(given, own, rtol=1e-12, atol=1e-12)
    assert counting.rows == len(t)  # only F(x + eps v, t + eps, s)
    moved = method.time_derivative(exact, x, t, s, COND[: len(t)], v, centre=centre + 1e-3)
    assert (moved - own).abs().min().item() > 0.1


class Counting(nn.Module):
    """Counts the rows the wrapped network evaluates."""

    def __init__(self, net):
        super().__init__()
        self.net, self.rows = net, 0

    def forward(self, x, t, s, cond):
        self.rows += x.shape[0]
        return self.net(x, t, s, cond)


@pytest.mark.parametrize(
    ("derivative", "extra"),
    [("finite_difference", 3), ("finite_difference_one_sided", 2), ("jvp", 2), ("jvp_primal", 1)],
)
@pytest.mark.parametrize("batch_passes", [True, False])
def test_evaluations_per_step(derivative, extra, batch_passes):
    """Rows of F a loss evaluates: the diagonal on the batch, then per SD sample the jump and
    the derivative (central: 2 rows, one-sided: 1, jvp: 1 JVP, jvp_primal: 1 JVP that is the
    jump as well)."""
    t, s = fixed_times()
    method = make_method("isd", derivative=derivative, batch_passes=batch_passes)
    net = Counting(ExactFlowMap())
    with_times(method, t, s).loss(net, gaussian_chunks(), COND)
    assert net.rows == len(t) + extra * len(t)


@pytest.mark.parametrize("derivative", DERIVATIVES)
@pytest.mark.parametrize("batch_passes", [True, False])
@pytest.mark.parametrize("sd_fraction", [1.0, 0.25])
def test_self_distillation_vanishes_at_the_exact_flow_map(derivative, batch_passes, sd_fraction):
    t, s = fixed_times()
    method = make_method(
        "isd", derivative=derivative, batch_passes=batch_passes, sd_fraction=sd_fraction
    )
    a = gaussian_chunks()
    torch.manual_seed(3)
    _, logs = with_times(method, t, s).loss(ExactFlowMap(), a, COND)
    z = drawn_noise(a, 3)
    tb = t.view(-1, 1, 1)
    x_t = (1 - tb) * a + tb * z
    expected_fm = (velocity(x_t, tb) - (z - a)).pow(2).mean()
    assert logs["loss_fm"].item() == pytest.approx(expected_fm.item(), rel=1e-10)
    # The residual of each option is (t - s) times its derivative's error: exact for the JVPs,
    # O(eps^2) for the central difference, O(eps) for the one-sided one; a wrong target (the
    # derivative term's sign flipped) would leave (2 (t - s) D)^2.
    k = round(sd_fraction * len(t))
    d_true = analytic_derivative(x_t[4:k], t[4:k], s[4:k], velocity(x_t[4:k], tb[4:k]))
    wrong = (2 * (t - s)[4:k].view(-1, 1, 1) * d_true).pow(2).mean().item()
    bound = {
        "jvp": 1e-20,
        "jvp_primal": 1e-20,
        "finite_difference": 1e-9,
        "finite_difference_one_sided": 1e-5,
    }[derivative]
    assert wrong > 1e-3
    assert logs["loss_sd"].item() < bound
    if derivative == "finite_difference_one_sided":  # and it is an O(eps) error, not zero
        assert logs["loss_sd"].item() > 1e-9


def isd_loss_by_hand(model, method, a, t, s, z, derivative, k=None):
    """METHOD.md's training step written out with ``derivative`` (the one-sided difference's
    centre is the jump itself, detached; the JVP's tangents are (v_hat, 1) at fixed s)."""
    k = len(t) if k is None else k
    tb = t.view(-1, 1, 1)
    x_t = (1 - tb) * a + tb * z
    f_diag = model(x_t, t, t, COND)
    f_jump = model(x_t[:k], t[:k], s[:k], COND[:k])
    with torch.no_grad():
        v_hat = model(x_t[:k], t[:k], t[:k], COND[:k])
        xk, tk, sk = x_t[:k], t[:k], s[:k]
        eps = method.fd_eps
        if derivative == "finite_difference_one_sided":
            d = (
                model(xk + eps * v_hat, tk + eps, sk, COND[:k]) - model(xk, tk, sk, COND[:k])
            ) / eps
        else:
            _, d = torch.func.jvp(
                lambda x_, t_: model(x_, t_, sk, COND[:k]), (xk, tk), (v_hat, torch.ones_like(tk))
            )
        target = v_hat - (tk - sk).view(-1, 1, 1) * d
    loss_fm = (f_diag - (z - a)).pow(2).flatten(1).mean(1)
    loss_sd = (f_jump - target).pow(2).flatten(1).mean(1)
    per_sample = loss_fm + torch.nn.functional.pad(loss_sd, (0, len(t) - k))
    return (per_sample / (per_sample.detach() + method.adaptive_c) ** method.adaptive_p).mean()


@pytest.mark.parametrize("derivative", ["finite_difference_one_sided", "jvp", "jvp_primal"])
@pytest.mark.parametrize("batch_passes", [True, False])
@pytest.mark.parametrize("sd_fraction", [1.0, 0.25])
def test_loss_and_gradient_are_the_ones_written_out_by_hand(derivative, batch_passes, sd_fraction):
    t, s = fixed_times()
    method = make_method(
        "isd", derivative=derivative, batch_passes=batch_passes, sd_fraction=sd_fraction
    )
    a, model = gaussian_chunks(), Perturbed()
    torch.manual_seed(3)
    loss, _ = with_times(method, t, s).loss(model, a, COND)
    (grad,) = torch.autograd.grad(loss, model.w)
    k = round(sd_fraction * len(t))
    reference = isd_loss_by_hand(model, method, a, t, s, drawn_noise(a, 3), derivative, k)
    (expected,) = torch.autograd.grad(reference, model.w)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


def small_unet() -> nn.Module:
    torch.manual_seed(0)
    net = ConditionalUnet1D(D, 3, down_dims=(8, 16), kernel_size=3, n_groups=4).double()
    for p in net.s_embed[-1].parameters():  # make the s dependence non-trivial
        nn.init.normal_(p, std=0.1)
    return net


@pytest.mark.parametrize("model", ["perturbed", "unet"])
@pytest.mark.parametrize("sd_fraction", [1.0, 0.25])
def test_jvp_primal_gives_the_loss_and_gradient_of_jvp(model, sd_fraction):
    """The JVP's primal output backpropagates to the weights as the plain jump pass does (and
    its tangent not at all): the same loss and gradient as ``jvp``, to float64 precision, on the
    hand-made network and on the package's U-Net (GroupNorm, Mish, FiLM)."""
    grads, losses = {}, {}
    a = gaussian_chunks()
    t, s = fixed_times()
    for derivative in EXACT:
        net = Perturbed() if model == "perturbed" else small_unet()
        method = make_method("isd", derivative=derivative, sd_fraction=sd_fraction)
        torch.manual_seed(3)
        loss, _ = with_times(method, t, s).loss(net, a, COND)
        params = [p for p in net.parameters() if p.requires_grad]
        grads[derivative] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
        losses[derivative] = loss.item()
    assert losses["jvp_primal"] == pytest.approx(losses["jvp"], rel=1e-12)
    assert grads["jvp"].abs().max().item() > 1e-3
    torch.testing.assert_close(grads["jvp_primal"], grads["jvp"], rtol=1e-10, atol=1e-13)


def test_jump_and_derivative_is_the_jump_with_gradient_and_the_jvp_without():
    net = small_unet()
    x = torch.randn(6, 16, D, dtype=DT, generator=torch.Generator().manual_seed(4))
    t = torch.linspace(0.3, 0.9, 6, dtype=DT)
    s, cond, v = 0.4 * t, torch.randn(6, 3, dtype=DT), torch.randn_like(x)
    method = make_method("isd", derivative="jvp_primal")
    jump, d = method.jump_and_derivative(net, x, t, s, cond, v)
    assert jump.requires_grad and not d.requires_grad
    torch.testing.assert_close(jump, net(x, t, s, cond), rtol=1e-12, atol=1e-14)
    expected = make_method("isd", derivative="jvp").time_derivative(net, x, t, s, cond, v)
    assert expected.abs().max().item() > 1e-3
    torch.testing.assert_close(d, expected, rtol=1e-10, atol=1e-13)


def test_bf16_warnings_name_each_option_that_amp_changes():
    def warned(derivative: str, amp: bool) -> list[str]:
        return make_method("isd", derivative=derivative).training_warnings(amp=amp)

    for derivative in DERIVATIVES:
        assert warned(derivative, False) == []
    assert warned("jvp", True) == []
    (central,) = warned("finite_difference", True)
    (one_sided,) = warned("finite_difference_one_sided", True)
    (primal,) = warned("jvp_primal", True)
    assert "derivative=finite_difference:" in central
    assert "finite_difference_one_sided" in one_sided and "worse than the central" in one_sided
    assert "jvp_primal" in primal and "runs as method.derivative=jvp" in primal


def test_jvp_primal_under_bf16_autocast_is_jvp():
    """Under bf16 autocast (training.amp=true) jvp_primal takes jvp's two passes: it runs (the
    forward-mode pass with gradient fails there) and gives jvp's loss and gradient."""
    a = gaussian_chunks().float()
    t, s = (u.float() for u in fixed_times())
    cond = torch.randn(len(t), 3, generator=torch.Generator().manual_seed(7))
    grads, losses = {}, {}
    for derivative in EXACT:
        net = small_unet().float()
        # One pass at a time in both, so that the two compute the same operations.
        method = make_method("isd", derivative=derivative, batch_passes=False)
        with_times(method, t, s)
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = method.loss(net, a, cond)
        grads[derivative] = torch.cat(
            [g.flatten() for g in torch.autograd.grad(loss, list(net.parameters()))]
        )
        losses[derivative] = loss.item()
    assert losses["jvp_primal"] == losses["jvp"]
    assert torch.equal(grads["jvp_primal"], grads["jvp"])
