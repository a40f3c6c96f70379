"""The baselines beside iSD: losses, sampling, learning, the diffusers reference."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cm_policy.methods import METHODS, make_method, method_defaults
from cm_policy.models.unet import ConditionalUnet1D

HORIZON, ACT, COND = 8, 2, 6
# Settings beside a method's YAML defaults that get their own runs here: name -> (method,
# hyper-parameters that replace the YAML's). Every registered method is tested with its YAML's
# defaults without being listed (VARIANTS), so a new method needs no edit of this file.
EXTRA_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "isd_jvp": ("isd", {"derivative": "jvp"}),
    "isd_quarter": ("isd", {"sd_fraction": 0.25}),
    "meanflow_noadapt": ("meanflow", {"adaptive_p": 0.0}),
}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    **{name: (name, {}) for name in sorted(METHODS)},
    **EXTRA_VARIANTS,
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(variant: str):
    name, overrides = VARIANTS[variant]
    return make_method(name, **overrides)


def raw_keys(variant: str) -> tuple[str, ...]:
    """The raw loss terms the variant's method declares it logs (its ``loss_keys``)."""
    name = VARIANTS[variant][0]
    keys = METHODS[name].loss_keys
    assert keys, f"method {name} declares no loss_keys"
    return keys


def tiny_net(seed: int = 0) -> ConditionalUnet1D:
    torch.manual_seed(seed)
    return ConditionalUnet1D(
        ACT, COND, down_dims=(16, 32), kernel_size=3, n_groups=4, time_embed_dim=16
    )


def test_extra_variants_change_a_registered_method_s_yaml_setting():
    """An extra variant is a registered method with hyper-parameters of its YAML set to other
    values (a misspelt key or a value equal to the default would test nothing new), under a name
    of its own (one of a method would hide that method's default variant)."""
    for variant, (name, overrides) in EXTRA_VARIANTS.items():
        assert name in METHODS and variant not in METHODS, variant
        defaults = method_defaults(name)
        assert overrides and set(overrides) <= set(defaults), (variant, sorted(defaults))
        assert all(defaults[k] != v for k, v in overrides.items()), variant


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loss_is_finite_and_samples_have_the_chunk_shape(variant: str):
    method, net = make(variant), tiny_net()
    torch.manual_seed(1)
    actions, cond = torch.rand(5, HORIZON, ACT) * 2 - 1, torch.randn(5, COND)
    loss, logs = method.loss(net, actions, cond)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    for key in raw_keys(variant):
        assert torch.isfinite(logs[key])
    # The default setting and every one a comparison evaluates (several steps among them).
    labels = dict.fromkeys([method.headline, *type(method).eval_samplers])
    with torch.no_grad():
        for label in labels:
            kind, steps = method.parse_label(label)
            out = method.sample(net, cond[:3], (3, HORIZON, ACT), steps=steps, sampler=kind)
            assert out.shape == (3, HORIZON, ACT), label
            assert out.abs().max() <= 1.0 and torch.isfinite(out).all(), label


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_few_steps_reduce_the_loss_on_a_trivial_dataset(variant: str):
    """One demonstrated chunk for every (zero) observation: every method can fit it exactly."""
    method, net = make(variant), tiny_net()
    method.set_progress(0, 0)
    target = torch.sin(torch.linspace(0, 3, HORIZON * ACT)).view(1, HORIZON, ACT) * 0.8
    actions, cond = target.expand(64, -1, -1).contiguous(), torch.zeros(64, COND)

    def raw_loss(seed: int) -> float:
        torch.manual_seed(seed)
        _, logs = method.loss(net, actions, cond)
        return sum(float(logs[k]) for k in raw_keys(variant))

    before = np.mean([raw_loss(100 + i) for i in range(4)])
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    torch.manual_seed(0)
    for _ in range(60):
        loss, _ = method.loss(net, actions, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = np.mean([raw_loss(100 + i) for i in range(4)])
    assert after < 0.5 * before, f"{variant}: raw loss {before:.4f} -> {after:.4f}"


def hand_alphas(n: int = 100) -> torch.Tensor:
    """squaredcos_cap_v2 cumulative alphas, written out (Nichol & Dhariwal's cosine schedule)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0).float()


def test_isd_sd_fraction_keeps_the_flow_term_and_thins_the_distillation_term():
    net = tiny_net()
    actions, cond = torch.rand(8, HORIZON, ACT) * 2 - 1, torch.randn(8, COND)

    def run(**kw):
        torch.manual_seed(3)
        loss, logs = make_method("isd", **kw).loss(net, actions, cond)
        return float(loss), float(logs["loss_fm"]), float(logs["loss_sd"])

    # Without the adaptive weight the loss is the plain mean of the per-sample terms.
    full = run(adaptive_p=0.0)
    quarter = run(adaptive_p=0.0, sd_fraction=0.25)
    # The same draws of t, s and z: the flow-matching term over the whole batch is unchanged, ...
    assert quarter[1] == pytest.approx(full[1], rel=1e-5)
    assert full[0] == pytest.approx(full[1] + full[2], rel=1e-5)
    # ... and the distillation term counts on 2 of the 8 samples (its log is their mean).
    assert quarter[0] == pytest.approx(quarter[1] + 0.25 * quarter[2], rel=1e-5)
    assert quarter[2] != pytest.approx(full[2], rel=1e-3)
    # One batched forward or separate ones: the same numbers (up to float rounding, which the
    # finite difference over 2 * fd_eps magnifies).
    assert run(adaptive_p=0.0, sd_fraction=0.25, batch_passes=False) == pytest.approx(
        quarter, rel=1e-5, abs=1e-6
    )
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="sd_fraction"):
            make_method("isd", sd_fraction=bad)


def test_ddpm_step_matches_a_hand_written_posterior_step():
    method = make_method("ddpm")
    scheduler = method._schedulers["ddpm"]
    scheduler.set_timesteps(100)
    ab = hand_alphas()
    torch.manual_seed(3)
    x, eps = torch.randn(2, HORIZON, ACT), torch.randn(2, HORIZON, ACT)
    for k in (99, 50, 1):
        got = scheduler.step(eps, k, x, generator=torch.Generator().manual_seed(7)).prev_sample
        beta = 1 - ab[k] / ab[k - 1]
        x0 = ((x - (1 - ab[k]).sqrt() * eps) / ab[k].sqrt()).clamp(-1, 1)
        mean = (ab[k - 1].sqrt() * beta / (1 - ab[k])) * x0 + (
            (1 - beta).sqrt() * (1 - ab[k - 1]) / (1 - ab[k])
        ) * x
        var = (beta * (1 - ab[k - 1]) / (1 - ab[k])).clamp_min(1e-20)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(got, mean + var.sqrt() * noise, atol=1e-5, rtol=1e-5)


def test_ddim_sampling_matches_a_hand_written_loop():
    """DDIM-10 with a fixed 'network' equals the deterministic DDIM update written by hand."""
    method = make_method("ddpm")
    ab = hand_alphas()

    def model(x, t, s, cond):  # a fixed function of the input and the time
        return 0.3 * x + t.view(-1, 1, 1) - cond.mean()

    cond = torch.full((2, COND), 0.1)
    got = method.sample(
        model, cond, (2, HORIZON, ACT), 10, torch.Generator().manual_seed(5), "ddim"
    )
    x = torch.randn((2, HORIZON, ACT), generator=torch.Generator().manual_seed(5))
    for k in range(99, 0, -10):  # "trailing" spacing: 99, 89, ..., 9
        eps = model(x, torch.full((2,), k / 100), None, cond)
        x0 = ((x - (1 - ab[k]).sqrt() * eps) / ab[k].sqrt()).clamp(-1, 1)
        prev = ab[k - 10] if k >= 10 else torch.tensor(1.0)
        x = prev.sqrt() * x0 + (1 - prev).sqrt() * eps
    torch.testing.assert_close(got, x.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    # Training noises with the same cosine schedule that both samplers integrate.
    for scheduler in (method.train_scheduler, *method._schedulers.values()):
        torch.testing.assert_close(scheduler.alphas_cumprod, hand_alphas(), atol=1e-6, rtol=1e-5)


def test_ddpm_rejects_bad_settings():
    with pytest.raises(ValueError, match=r"method ddpm has samplers \['ddpm', 'ddim'\]"):
        make_method("ddpm", sampler="euler")
    ddpm = make_method("ddpm")
    with pytest.raises(ValueError, match="got sampler='euler'"):
        ddpm.sample(tiny_net(), torch.zeros(1, COND), (1, HORIZON, ACT), 1, None, "euler")
    with pytest.raises(ValueError, match=r"steps must be in \[1, 100\]"):
        ddpm.sample(tiny_net(), torch.zeros(1, COND), (1, HORIZON, ACT), steps=101)


def test_ict_boundary_condition_and_curriculum():
    method, net = make_method("ict"), tiny_net()
    x = torch.randn(3, HORIZON, ACT)
    sigma = torch.full((3,), method.sigma_min)
    torch.testing.assert_close(method.consistency(net, x, sigma, torch.zeros(3, COND)), x)
    method.set_progress(0, 800)
    assert method.n_intervals() == 11
    method.set_progress(799, 800)
    assert method.n_intervals() == 1281
    method.set_progress(100, 800)  # 8 stages of 100 steps: 10, 20, 40, ...
    assert method.n_intervals() == 21


def assert_episodes_match_metrics(folder: Path, seeds: list[int]) -> None:
    """An evaluation folder's metrics.json summarises its episodes.json, run on ``seeds``."""
    metrics = json.loads((folder / "metrics.json").read_text())
    episodes = json.loads((folder / "episodes.json").read_text())
    assert [e["seed"] for e in episodes] == seeds
    assert metrics["n_episodes"] == len(seeds) and metrics["seeds"] == [seeds[0], seeds[-1]]
    assert metrics["mean_score"] == pytest.approx(np.mean([e["max_reward"] for e in episodes]))
    assert metrics["success_rate"] == pytest.approx(np.mean([e["success"] for e in episodes]))


def test_methods_declare_what_they_log_and_sample():
    """The registry's declarations are what the methods do: the logged terms are the declared
    loss keys, every evaluated sampler label parses to one of the method's sampler kinds, and the
    headline is the label of the YAML's default setting."""
    for name, cls in METHODS.items():
        method, net = make_method(name), tiny_net()
        torch.manual_seed(0)
        _, logs = method.loss(net, torch.rand(4, HORIZON, ACT) * 2 - 1, torch.randn(4, COND))
        assert set(cls.loss_keys) <= set(logs), name
        for label in cls.eval_samplers:
            kind, steps = method.parse_label(label)
            assert kind in cls.samplers and steps >= 1 and method.label(kind, steps) == label
        assert method.headline == method.label(None, method.default_steps)
    assert make_method("ddpm").headline == "ddpm:100"
    assert make_method("isd").headline == "1"


def test_registry_discovers_a_new_module_and_refuses_duplicate_names(tmp_path: Path):
    import importlib
    import sys

    from cm_policy.methods.base import Method
    from cm_policy.registry import discover

    pkg = tmp_path / "extra_methods"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    body = (
        "from cm_policy.methods.base import Method\n"
        "class Mine(Method):\n    name = {name!r}\n"
        "    def loss(self, model, actions, cond): ...\n"
        "    def sample(self, model, cond, shape, steps=None, generator=None, sampler=None,"
        " z=None): ...\n"
    )
    (pkg / "mine.py").write_text(body.format(name="mine"))
    sys.path.insert(0, str(tmp_path))
    try:
        found = discover(importlib.import_module("extra_methods"), Method)
        assert list(found) == ["mine"] and found["mine"].__module__ == "extra_methods.mine"
        (pkg / "twin.py").write_text(body.format(name="mine"))
        with pytest.raises(RuntimeError, match="two Methods are named 'mine'"):
            discover(importlib.import_module("extra_methods"), Method)
    finally:
        sys.path.remove(str(tmp_path))
        for mod in [m for m in sys.modules if m.startswith("extra_methods")]:
            del sys.modules[mod]


def test_regression_is_deterministic_and_one_step():
    method, net = make_method("regression"), tiny_net()
    cond = torch.randn(3, COND)
    a = method.sample(net, cond, (3, HORIZON, ACT), generator=torch.Generator().manual_seed(0))
    b = method.sample(net, cond, (3, HORIZON, ACT), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)  # no noise enters
    # ... and it says so (the noise diagnostic skips it).
    assert not METHODS["regression"].uses_noise
    with pytest.raises(ValueError, match="regression samples in one step"):
        method.sample(net, cond, (3, HORIZON, ACT), steps=2)
    with pytest.raises(ValueError, match="regression samples in one step"):
        make_method("regression", default_steps=4)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_uses_noise_says_whether_the_noise_draw_changes_the_chunk(name: str):
    """A method that declares ``uses_noise`` samples other chunks for other noise draws (the
    noise diagnostic measures that spread); one that does not samples the same chunk."""
    method, net = make_method(name), tiny_net()
    cond, shape = torch.randn(3, COND), (3, HORIZON, ACT)
    with torch.no_grad():
        a, b = (
            method.sample(net, cond, shape, generator=torch.Generator().manual_seed(s))
            for s in (0, 1)
        )
    if METHODS[name].uses_noise:
        assert not torch.allclose(a, b), name
    else:
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["isd", "flow", "ddpm", "meanflow", "ict"])
def test_zero_initial_noise_is_what_the_sampler_starts_from(name: str):
    """``z`` replaces the first noise draw: zero noise gives the same chunk whatever the
    generator (for the deterministic samplers), and random z reproduces the seeded draw."""
    method, net = make_method(name), tiny_net()
    cond, shape = torch.randn(2, COND), (2, HORIZON, ACT)
    kind = "ddim" if name == "ddpm" else None
    z = torch.zeros(shape)
    first = method.sample(net, cond, shape, 2, torch.Generator().manual_seed(0), kind, z)
    second = method.sample(net, cond, shape, 2, torch.Generator().manual_seed(1), kind, z)
    if name != "ict":  # iCT re-noises between its steps
        torch.testing.assert_close(first, second)
    drawn = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    seeded = method.sample(net, cond, shape, 1, torch.Generator().manual_seed(3), kind)
    given = method.sample(net, cond, shape, 1, torch.Generator().manual_seed(9), kind, drawn)
    torch.testing.assert_close(seeded, given)
    assert not torch.allclose(first, seeded)


@pytest.mark.parametrize(("name", "kind", "steps"), [("isd", None, 2), ("ddpm", "ddpm", 4)])
def test_a_generator_per_row_makes_rows_independent_of_the_batch(name, kind, steps):
    """With one generator per batch row, a row's sample is the one it gets alone (the stochastic
    DDPM steps included), up to float rounding."""
    method, net = make_method(name), tiny_net()
    cond = torch.randn(3, COND)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batch = method.sample(net, cond, (3, HORIZON, ACT), steps, gens([5, 6, 7]), kind)
    for row, seed in enumerate([5, 6, 7]):
        alone = method.sample(
            net, cond[row : row + 1], (1, HORIZON, ACT), steps, gens([seed]), kind
        )
        torch.testing.assert_close(batch[row : row + 1], alone, atol=1e-5, rtol=1e-5)
    other = method.sample(net, cond, (3, HORIZON, ACT), steps, gens([5, 6, 8]), kind)
    torch.testing.assert_close(other[:2], batch[:2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(other[2], batch[2])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        method.sample(net, cond, (3, HORIZON, ACT), steps, gens([1, 2]), kind)
