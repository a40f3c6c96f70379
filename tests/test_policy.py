"""The network, iSD, the policy and its checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from cm_policy.checkpoint import load_policy, resolve_checkpoint
from cm_policy.data import LinearNormalizer
from cm_policy.methods import make_method
from cm_policy.models.encoders import ImageEncoder, crop_sizes
from cm_policy.models.unet import ConditionalUnet1D
from cm_policy.policy import Policy

SPEC = {
    "task": {"action_dim": 2, "low_dim": {"keypoints": 20}, "image_keys": []},
    "horizon": 16,
    "n_obs_steps": 2,
    "n_action_steps": 8,
    "model": {"down_dims": [16, 32], "kernel_size": 3, "n_groups": 4, "time_embed_dim": 16},
    "method": {"name": "isd"},
}


def make_policy(seed: int = 0) -> Policy:
    torch.manual_seed(seed)
    norm = LinearNormalizer()
    norm.fit(
        {
            "action": np.random.default_rng(0).uniform(50, 450, (100, 2)),
            "keypoints": np.random.default_rng(1).uniform(0, 512, (100, 20)),
        }
    )
    return Policy(SPEC, norm)


def test_unet_output_shape_and_s_branch_starts_at_zero():
    torch.manual_seed(0)
    net = ConditionalUnet1D(2, 10, down_dims=(16, 32, 64), kernel_size=3, n_groups=4)
    x, cond = torch.randn(3, 16, 2), torch.randn(3, 10)
    t = torch.rand(3)
    out = net(x, t, torch.zeros(3), cond)
    assert out.shape == (3, 16, 2)
    # The zero-initialised s branch makes the untrained network independent of s.
    torch.testing.assert_close(out, net(x, t, torch.rand(3), cond))


def test_jvp_and_finite_difference_derivatives_agree():
    torch.manual_seed(0)
    net = ConditionalUnet1D(2, 6, down_dims=(8, 16), kernel_size=3, n_groups=4).double()
    for p in net.s_embed[-1].parameters():  # make the s dependence non-trivial
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(4, 16, 2, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64) * 0.8 + 0.1
    s = t * 0.3
    cond = torch.randn(4, 6, dtype=torch.float64)
    v = torch.randn_like(x)
    fd = make_method("isd", fd_eps=1e-4).time_derivative(net, x, t, s, cond, v)
    jvp = make_method("isd", derivative="jvp").time_derivative(net, x, t, s, cond, v)
    assert jvp.abs().max() > 1e-3
    torch.testing.assert_close(fd, jvp, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("derivative", ["finite_difference", "jvp"])
def test_isd_loss_finite_and_decreases(derivative: str):
    torch.manual_seed(0)
    net = ConditionalUnet1D(2, 4, down_dims=(16, 32), kernel_size=3, n_groups=4)
    method = make_method("isd", derivative=derivative)
    # A trivial dataset: the action chunk is a fixed function of the condition.
    cond = torch.randn(64, 4)
    actions = torch.tanh(cond[:, :2]).unsqueeze(1).expand(64, 16, 2).contiguous()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    fm = []
    for _ in range(60):
        loss, logs = method.loss(net, actions, cond)
        assert torch.isfinite(loss) and torch.isfinite(logs["loss_sd"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        fm.append(logs["loss_fm"].item())
    assert np.mean(fm[-10:]) < 0.6 * np.mean(fm[:10])


def test_one_step_sampling_shape_and_range():
    policy = make_policy()
    out = policy.method.sample(policy.net, torch.randn(5, 40), (5, 16, 2), steps=1)
    assert out.shape == (5, 16, 2)
    assert out.min() >= -1 and out.max() <= 1
    obs = {"keypoints": np.random.default_rng(0).uniform(0, 512, (3, 2, 20)).astype(np.float32)}
    action = policy.predict_action(obs)
    assert action.shape == (3, 8, 2)
    assert np.all(action >= 50 - 1e-3) and np.all(action <= 450 + 1e-3)
    two = policy.predict_action(obs, steps=2)
    assert two.shape == (3, 8, 2)
    # Executing fewer (or more) actions per chunk is an evaluation choice, within the horizon.
    policy.set_n_action_steps(4)
    assert policy.predict_action(obs).shape == (3, 4, 2)
    policy.set_n_action_steps(15)
    assert policy.predict_action(obs).shape == (3, 15, 2)
    for bad in (0, 16):
        with pytest.raises(ValueError, match=rf"n_action_steps must be in \[1, 15\].*got {bad}"):
            policy.set_n_action_steps(bad)


def test_predict_action_rejects_bad_observations():
    policy = make_policy()
    with pytest.raises(ValueError, match="missing keys"):
        policy.predict_action({"state": np.zeros((1, 2, 5))})
    with pytest.raises(ValueError, match=r"shape \(batch, >=2, 20\)"):
        policy.predict_action({"keypoints": np.zeros((1, 2, 18))})


def test_save_load_gives_identical_actions(tmp_path: Path):
    from cm_policy.checkpoint import save_checkpoint

    policy = make_policy()
    ema = copy.deepcopy(policy)
    opt = torch.optim.AdamW(policy.parameters())
    folder = save_checkpoint(
        tmp_path,
        7,
        config_yaml="{}",
        policy=policy,
        ema_policy=ema,
        optimizer=opt,
        trainer_state={},
    )
    assert resolve_checkpoint(tmp_path) == folder
    loaded = load_policy(tmp_path)
    obs = {"keypoints": np.random.default_rng(0).uniform(0, 512, (4, 2, 20)).astype(np.float32)}
    a = policy.eval().predict_action(obs, generator=torch.Generator().manual_seed(3))
    b = loaded.predict_action(obs, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(a, b)
    # Loading never unpickles: every file of a checkpoint is safetensors, JSON or YAML.
    assert {p.suffix for p in folder.iterdir()} <= {".safetensors", ".json", ".yaml"}


def test_bad_checkpoint_gives_clear_error(tmp_path: Path):
    (tmp_path / "policy.json").write_text("{}")
    with pytest.raises(ValueError, match="missing"):
        load_policy(tmp_path)


def test_ema_only_checkpoint_loads_and_devices_are_checked(tmp_path: Path):
    from cm_policy.checkpoint import save_policy

    policy = make_policy()
    folder = save_policy(policy, tmp_path)
    (folder / "model.safetensors").unlink()  # a deployment copy with the EMA weights alone
    assert resolve_checkpoint(tmp_path, "ema") == folder
    with pytest.raises(ValueError, match=r"missing \['model.safetensors'\]"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="weights must be 'ema' or 'model', got 'best'"):
        resolve_checkpoint(tmp_path, "best")
    assert next(load_policy(tmp_path, device="cpu").parameters()).device.type == "cpu"
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(load_policy(tmp_path, device="auto").parameters()).device.type == auto
    with pytest.raises(ValueError, match=r"device must be one of .* got 'tpu'"):
        load_policy(tmp_path, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device; use device=cpu or auto"):
            load_policy(tmp_path, device="cuda")


def test_seeded_noise_is_the_cpu_generators_whatever_the_device():
    from cm_policy.methods.base import noise

    like = torch.zeros(1, dtype=torch.float32)
    drawn = noise((3, 16, 2), like, torch.Generator().manual_seed(5))
    torch.testing.assert_close(
        drawn, torch.randn((3, 16, 2), generator=torch.Generator().manual_seed(5)), rtol=0, atol=0
    )
    if torch.cuda.is_available():  # a CUDA policy seeded from a CPU generator: the same noise
        on_gpu = noise((3, 16, 2), like.cuda(), torch.Generator().manual_seed(5))
        assert on_gpu.device.type == "cuda"
        torch.testing.assert_close(on_gpu.cpu(), drawn, rtol=0, atol=0)


def test_sampler_and_noise_are_arguments_of_predict_action():
    policy = make_policy()
    obs = {"keypoints": np.random.default_rng(2).uniform(0, 512, (3, 2, 20)).astype(np.float32)}

    def act(seed: int, **kwargs) -> np.ndarray:
        return policy.predict_action(obs, generator=torch.Generator().manual_seed(seed), **kwargs)

    # Zero initial noise: the same chunk whatever the generator; random noise: it varies.
    np.testing.assert_array_equal(act(0, noise="zero"), act(1, noise="zero"))
    assert not np.allclose(act(0), act(1))
    assert not np.allclose(act(0, noise="zero"), act(0))
    # The mean of K draws is the mean of K consecutive draws from the same generator.
    generator = torch.Generator().manual_seed(4)
    draws = [policy.predict_action(obs, generator=generator) for _ in range(3)]
    np.testing.assert_allclose(act(4, noise="mean:3"), np.mean(draws, axis=0), rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(act(0, sampler="flowmap", steps=2), act(0, steps=2))
    with pytest.raises(ValueError, match=r"noise must be random \| zero \| mean:K, got 'mean:0'"):
        act(0, noise="mean:0")
    with pytest.raises(ValueError, match=r"method isd has samplers \['flowmap'\]"):
        act(0, sampler="ddim")


def test_non_finite_actions_and_far_observations_are_refused():
    from cm_policy.policy import ActionRefused

    policy = make_policy()
    obs = {"keypoints": np.full((3, 2, 20), 100.0, dtype=np.float32)}
    assert np.isfinite(policy.predict_action(obs)).all()
    obs["keypoints"][1] = 1e38  # finite, but the network overflows
    with pytest.raises(ActionRefused, match=r"rows \[1\]: the policy computed non-finite") as err:
        policy.predict_action(obs)
    assert [r is None for r in err.value.reasons] == [True, False, True]
    assert np.isfinite(err.value.actions[[0, 2]]).all()
    obs["keypoints"][1] = 100.0
    obs["keypoints"][2, :, 0] = 512 + 3 * 512  # 7 half-ranges from the middle of [0, 512]
    assert np.isfinite(policy.predict_action(obs)).all()  # no limit by default
    policy.set_obs_limit(2.0)
    with pytest.raises(ActionRefused, match=r"rows \[2\]: observation 'keypoints' lies 7"):
        policy.predict_action(obs)
    with pytest.raises(ValueError, match="obs_limit must be >= 1"):
        policy.set_obs_limit(0.5)


def test_loading_a_policy_imports_no_training_code():
    import subprocess
    import sys

    for statement in (
        "from cm_policy.policy import Policy",
        "from cm_policy.checkpoint import load_policy",
    ):
        out = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", statement],
            capture_output=True,
            text=True,
            check=True,
        )
        imported = [line.split("|")[-1].strip() for line in out.stderr.splitlines()]
        assert "cm_policy.policy" in imported  # the probe sees the package's imports
        assert not [m for m in imported if m.startswith("cm_policy.training")], statement


def test_image_crops_are_each_samples_window_and_the_layout_changes_no_value():
    """Training: each sample's random c x c window at its drawn offsets; evaluation: the centre.
    The encoder's output is that of the same network on plain (N, C, H, W) float images."""
    torch.manual_seed(0)
    encoder = ImageEncoder(
        {"image": (8, 8, 3)}, {"agent_pos": 2}, n_obs_steps=1, crop=4, widths=(8, 8, 8, 8)
    )
    x = torch.arange(6 * 3 * 8 * 8, dtype=torch.float32).reshape(6, 3, 8, 8)
    torch.manual_seed(1)
    crops = encoder.train()._crop(x, "image")
    torch.manual_seed(1)
    top, left = torch.randint(0, 5, (6,)), torch.randint(0, 5, (6,))
    assert crops.shape == (6, 3, 4, 4)
    assert len(set(zip(top.tolist(), left.tolist(), strict=True))) > 1  # offsets differ
    for i in range(6):
        assert torch.equal(crops[i], x[i, :, top[i] : top[i] + 4, left[i] : left[i] + 4])
    assert torch.equal(encoder.eval()._crop(x, "image"), x[..., 2:6, 2:6])
    # Frames of another size than the camera's: refused in either mode, naming both sizes.
    for mode in (encoder.train(), encoder.eval()):
        with pytest.raises(
            ValueError, match="camera 'image': frames of 3x8, this encoder takes 8x8"
        ):
            mode._crop(torch.zeros(2, 3, 3, 8), "image")
    images = torch.randint(0, 256, (2, 1, 8, 8, 3), dtype=torch.uint8)
    obs = {"image": images, "agent_pos": torch.zeros(2, 1, 2)}
    plain = images[:, 0].permute(0, 3, 1, 2)[..., 2:6, 2:6].float().contiguous() / 255.0
    expected = encoder.backbones["image"](plain)
    assert torch.allclose(encoder(obs)[:, :8], expected, atol=1e-5)


def test_each_camera_has_its_own_size_and_crop():
    """Two cameras of different sizes (one smaller than 84): a fraction of each side, pixels,
    [h, w] and a per-camera mapping give each camera its own window, centred in evaluation and
    at random offsets within its frames in training; a crop larger than a camera's frames is one
    line naming the camera and both sizes."""
    shapes = {"front": (30, 40, 3), "wrist": (12, 20, 3)}
    assert crop_sizes(0.5, shapes) == {"front": (15, 20), "wrist": (6, 10)}
    assert crop_sizes(10, shapes) == {"front": (10, 10), "wrist": (10, 10)}
    assert crop_sizes([12, 18], shapes) == {"front": (12, 18), "wrist": (12, 18)}
    assert crop_sizes({"front": 0.9, "wrist": [8, 16]}, shapes) == {
        "front": (27, 36),
        "wrist": (8, 16),
    }
    with pytest.raises(
        ValueError,
        match=r"camera 'wrist': its frames are 12x20, smaller than the crop model.crop=16 "
        r"\(16x16\): set model.crop to at most 12",
    ):
        crop_sizes(16, shapes)
    with pytest.raises(
        ValueError, match=r"model.crop names cameras \['front'\] but not \['wrist'\]"
    ):
        crop_sizes({"front": 8}, shapes)
    for bad in (0, 1.5, -3, [4], "84", True):
        with pytest.raises(ValueError, match=r"model\.crop for camera 'front' must be pixels"):
            crop_sizes(bad, {"front": (30, 40, 3)})
    torch.manual_seed(0)
    encoder = ImageEncoder(
        shapes, {}, n_obs_steps=2, crop={"front": 0.5, "wrist": [8, 16]}, widths=(8, 8, 8, 8)
    )
    front = torch.arange(5 * 3 * 30 * 40, dtype=torch.float32).reshape(5, 3, 30, 40)
    assert torch.equal(encoder.eval()._crop(front, "front"), front[..., 7:22, 10:30])
    wrist = torch.arange(5 * 3 * 12 * 20, dtype=torch.float32).reshape(5, 3, 12, 20)
    assert torch.equal(encoder.eval()._crop(wrist, "wrist"), wrist[..., 2:10, 2:18])
    torch.manual_seed(3)
    crops = encoder.train()._crop(wrist, "wrist")
    torch.manual_seed(3)
    top, left = torch.randint(0, 5, (5,)), torch.randint(0, 5, (5,))
    for i in range(5):
        assert torch.equal(crops[i], wrist[i, :, top[i] : top[i] + 8, left[i] : left[i] + 16])
    obs = {
        "front": torch.randint(0, 256, (3, 2, 30, 40, 3), dtype=torch.uint8),
        "wrist": torch.randint(0, 256, (3, 2, 12, 20, 3), dtype=torch.uint8),
    }
    assert encoder.eval()(obs).shape == (3, encoder.out_dim) == (3, 2 * 2 * 8)
