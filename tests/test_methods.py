"""The baselines beside iSD: losses, sampling, learning, the diffusers reference, the harness."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from cm_policy.methods import DDPM, ICT, METHODS, make_method
from cm_policy.models.unet import ConditionalUnet1D

HORIZON, ACT, COND = 8, 2, 6
VARIANTS = {
    "isd": {},
    "isd_jvp": {"derivative": "jvp"},
    "ddpm": {},
    "flow": {},
    "meanflow": {},
    "meanflow_noadapt": {"adaptive_p": 0.0},
    "ict": {},
}
RAW = {"isd": ("loss_fm", "loss_sd"), "ddpm": ("loss_eps",), "flow": ("loss_fm",)}
RAW.update({"meanflow": ("loss_mf",), "ict": ("loss_ct",)})


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def base_name(variant: str) -> str:
    return variant.split("_")[0]


def make(variant: str):
    return make_method(base_name(variant), **VARIANTS[variant])


def tiny_net(seed: int = 0) -> ConditionalUnet1D:
    torch.manual_seed(seed)
    return ConditionalUnet1D(
        ACT, COND, down_dims=(16, 32), kernel_size=3, n_groups=4, time_embed_dim=16
    )


def test_every_registered_method_is_covered():
    assert {base_name(v) for v in VARIANTS} == set(METHODS)


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
    for key in RAW[base_name(variant)]:
        assert torch.isfinite(logs[key])
    with torch.no_grad():
        for steps in (1, 3):
            out = method.sample(net, cond[:3], (3, HORIZON, ACT), steps=steps)
            assert out.shape == (3, HORIZON, ACT)
            assert out.abs().max() <= 1.0 and torch.isfinite(out).all()


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
        return sum(float(logs[k]) for k in RAW[base_name(variant)])

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


def test_ddpm_step_matches_a_hand_written_posterior_step():
    method = DDPM()
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
    method = DDPM(sampler="ddim")
    ab = hand_alphas()

    def model(x, t, s, cond):  # a fixed function of the input and the time
        return 0.3 * x + t.view(-1, 1, 1) - cond.mean()

    cond = torch.full((2, COND), 0.1)
    got = method.sample(model, cond, (2, HORIZON, ACT), 10, torch.Generator().manual_seed(5))
    x = torch.randn((2, HORIZON, ACT), generator=torch.Generator().manual_seed(5))
    for k in range(99, 0, -10):  # "trailing" spacing: 99, 89, ..., 9
        eps = model(x, torch.full((2,), k / 100), None, cond)
        x0 = ((x - (1 - ab[k]).sqrt() * eps) / ab[k].sqrt()).clamp(-1, 1)
        prev = ab[k - 10] if k >= 10 else torch.tensor(1.0)
        x = prev.sqrt() * x0 + (1 - prev).sqrt() * eps
    torch.testing.assert_close(got, x.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    assert isinstance(method._schedulers["ddim"], DDIMScheduler)
    assert isinstance(method._schedulers["ddpm"], DDPMScheduler)


def test_ddpm_rejects_bad_settings():
    with pytest.raises(ValueError, match="sampler must be one of"):
        DDPM(sampler="euler")
    with pytest.raises(ValueError, match=r"steps must be in \[1, 100\]"):
        DDPM().sample(tiny_net(), torch.zeros(1, COND), (1, HORIZON, ACT), steps=101)


def test_ict_boundary_condition_and_curriculum():
    method, net = ICT(), tiny_net()
    x = torch.randn(3, HORIZON, ACT)
    sigma = torch.full((3,), method.sigma_min)
    torch.testing.assert_close(method.consistency(net, x, sigma, torch.zeros(3, COND)), x)
    method.set_progress(0, 800)
    assert method.n_intervals() == 11
    method.set_progress(799, 800)
    assert method.n_intervals() == 1281
    method.set_progress(100, 800)  # 8 stages of 100 steps: 10, 20, 40, ...
    assert method.n_intervals() == 21


def test_compare_harness_runs_end_to_end_and_resumes(tiny_pusht: Path, tmp_path: Path):
    from cm_policy.evaluation.compare import run_compare, write_report

    out = tmp_path / "runs"
    results = run_compare("pusht_keypoints", "tiny", ["isd", "ddpm"], out, dataset=str(tiny_pusht))
    runs = results["runs"]
    assert set(runs) == {"isd_s0", "ddpm_s0"}
    assert set(runs["ddpm_s0"]["entries"]) == {"ddpm:100", "ddim:10", "ddim:1"}
    for run in runs.values():
        for entry in run["entries"].values():
            assert entry["n_episodes"] == 2 and 0 <= entry["mean_score"] <= 1
            assert entry["latency_ms"] > 0
        assert run["train"]["nonfinite_steps"] == 0 and run["train"]["grad_max"] > 0
        assert run["degeneracy"]["spread"] >= 0
    report = write_report(results, tmp_path / "results", "python eval/compare.py ...", "notes")
    text = report.read_text()
    assert "| isd | isd-1 | 1 |" in text and "| ddpm | ddpm-100 | 100 |" in text
    for png in ("grad", "loss", "score"):
        assert (tmp_path / "results" / f"compare_pusht_keypoints_{png}.png").stat().st_size > 0
    # A second call reuses every finished run and evaluation.
    stamp = (out / "isd_s0" / "compare" / "1" / "metrics.json").stat().st_mtime_ns
    again = run_compare("pusht_keypoints", "tiny", ["isd", "ddpm"], out, dataset=str(tiny_pusht))
    assert (out / "isd_s0" / "compare" / "1" / "metrics.json").stat().st_mtime_ns == stamp
    assert json.dumps(again["runs"], sort_keys=True) == json.dumps(runs, sort_keys=True)


def test_train_seconds_plans_the_steps_from_step_costs():
    from cm_policy.evaluation.compare import RUN_OVERHEAD, plan_steps

    costs = {"isd": 0.03, "ddpm": 0.02}
    # 2 methods x 2 seeds at 0.05 s x RUN_OVERHEAD a step pair in 300 s, rounded down to 100s
    expected = int(300 / (RUN_OVERHEAD * 0.05 * 2)) // 100 * 100
    assert plan_steps(costs, ["isd", "ddpm"], 2, 300) == expected
    assert expected * RUN_OVERHEAD * 0.05 * 2 <= 300
    assert plan_steps(costs, ["isd"], 1, 1) == 100  # never fewer than 100
    with pytest.raises(ValueError, match=r"no step cost for \['flow'\]"):
        plan_steps(costs, ["isd", "flow"], 1, 300)
