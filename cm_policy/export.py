"""ONNX export: a policy's whole ``predict_action`` as one graph, for ONNX Runtime.

A one-step policy is one graph: normaliser, observation encoder, one network evaluation, clipping
and unnormaliser. :func:`export_policy` writes it as an ONNX model whose

- inputs are one per observation key, the raw window of the last ``n_obs_steps`` observations
  (low-dim keys float32 ``(batch, n_obs_steps, dim)``, images uint8
  ``(batch, n_obs_steps, H, W, 3)``), and ``noise``, the initial noise float32
  ``(batch, horizon, action_dim)``, so that a caller that sends the same noise gets the same
  actions (and a seeded request is reproducible);
- output is ``action``, the raw actions ``(batch, n_action_steps, action_dim)``, computed as
  :meth:`cm_policy.policy.Policy.predict_action` computes them from that noise (the image
  encoder's evaluation-mode centre crop included);
- batch dimension is dynamic;
- metadata (``metadata_props["cm_policy"]``) is a JSON object: the policy spec, the observation
  keys with their shapes and dtypes, ``n_obs_steps``, ``n_action_steps``, ``horizon``,
  ``action_dim``, ``control_hz``, the method, sampler label and steps, the normaliser's scale
  and offset of each low-dim key and of the action, and the cm-policy version (see
  :func:`export_metadata`).

The sampler is the method's headline one (its default kind and steps) unless ``sampler=`` /
``steps=`` ask for another; N steps are unrolled into the graph. A sampler that draws fresh noise
after the initial noise (DDPM's ``ddpm`` chain, iCT's re-noised multi-step sampling) cannot be a
function of the inputs and is refused with a ValueError saying so. ONNX Runtime runs the file
without torch: :class:`cm_policy.serve.onnx_policy.OnnxPolicy`.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import warnings
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cm_policy.atomic import write_bytes_atomic
from cm_policy.policy import Policy

METADATA_KEY = "cm_policy"  # the metadata_props entry holding the JSON metadata
METADATA_FORMAT = 1
NOISE, ACTION = "noise", "action"
OPSET = 18
LOW_DIM_DTYPE, IMAGE_DTYPE = "float32", "uint8"
# ONNX operators that draw random numbers: a graph holding one is not a function of its inputs.
RANDOM_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial"}
)


def cm_policy_version() -> str:
    try:
        return package_metadata.version("cm-policy")
    except package_metadata.PackageNotFoundError:  # a source tree that is not installed
        return "unknown"


# The modules of pyproject.toml's optional "onnx" extra: torch.onnx's exporter needs onnx and
# onnxscript, and every export is checked in ONNX Runtime before it is written (:func:`verify`).
ONNX_EXTRA_MODULES = ("onnx", "onnxscript", "onnxruntime")
ONNX_INSTALL = "pip install 'cm-policy[onnx]' (from a checkout: pip install -e '.[onnx]')"


def require_onnx_extra() -> None:
    """Raise a ModuleNotFoundError that says how to install them when modules of the ``onnx``
    extra are missing: checked before any work, since torch.onnx otherwise fails deep inside
    the export with a bare "No module named 'onnx'"."""
    missing = [name for name in ONNX_EXTRA_MODULES if not _importable(name)]
    if missing:
        raise ModuleNotFoundError(
            f"cm-policy export needs the optional 'onnx' extra ({', '.join(ONNX_EXTRA_MODULES)}); "
            f"not installed: {', '.join(missing)}. Install it with: {ONNX_INSTALL}",
            name=missing[0],
        )


def _importable(name: str) -> bool:
    from importlib.util import find_spec

    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or without a spec
        return False


def scale_offset(policy: Policy, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The normaliser's float32 scale and offset of ``key`` (``y = x * scale + offset``)."""
    state = policy.normalizer.state_dict()
    return state[f"{key}.scale"].float().clone(), state[f"{key}.offset"].float().clone()


class FiniteCheck(nn.Module):
    """The network, recording per batch row whether all its outputs were finite.

    The graph returns NaN actions for a row where the network computed NaN or inf, whatever the
    sampler's clipping and the runtime's Clip/Min/Max do with them, so that the row is refused
    (``OnnxPolicy``, the server). torch refuses NaN the same way; an overflow to inf, which
    torch's clamp turns into a bound, is refused here too. ONNX Runtime's kernels do not overflow
    where torch's do: observations far out of range (1e38) that make torch's GroupNorm compute
    NaN can give finite, meaningless actions in ONNX Runtime, which only ``obs_limit`` refuses.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.finite: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, c: torch.Tensor):
        y = self.net(x, t, s, c)
        ok = torch.isfinite(y).flatten(1).all(dim=1)
        self.finite = ok if self.finite is None else self.finite & ok
        return y


class ActionGraph(nn.Module):
    """``predict_action`` of ``policy`` from given initial noise, as a traceable module.

    ``forward(*observations, noise)`` takes the observation windows in ``policy``'s key order
    (low-dim keys, then image keys), each exactly ``n_obs_steps`` long, and returns the raw
    actions. It repeats :meth:`Policy.predict_action`'s arithmetic operation for operation:
    ``x * scale + offset`` for each low-dim key, the encoder, ``method.sample(..., z=noise)``
    (which clips to [-1, 1]), ``(x - offset) / scale`` and the executed slice of the chunk; rows
    where the network computed a non-finite value are NaN (:class:`FiniteCheck`), to be refused.
    """

    def __init__(self, policy: Policy, steps: int, sampler: str):
        super().__init__()
        self.policy = policy.eval()
        self.steps, self.sampler = steps, sampler
        self.keys = [*policy.low_dim, *policy.image_keys]
        for i, key in enumerate(policy.low_dim):
            scale, offset = scale_offset(policy, key)
            self.register_buffer(f"obs_scale_{i}", scale, persistent=False)
            self.register_buffer(f"obs_offset_{i}", offset, persistent=False)
        scale, offset = scale_offset(policy, "action")
        self.register_buffer("action_scale", scale, persistent=False)
        self.register_buffer("action_offset", offset, persistent=False)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        policy = self.policy
        *observations, noise = inputs
        obs = dict(zip(self.keys, observations, strict=True))
        normalized = {}
        for i, key in enumerate(policy.low_dim):
            scale, offset = getattr(self, f"obs_scale_{i}"), getattr(self, f"obs_offset_{i}")
            normalized[key] = obs[key].float() * scale + offset
        normalized.update({k: obs[k] for k in policy.image_keys})
        cond = policy.obs_encoder(normalized)
        shape = tuple(noise.shape)
        net = FiniteCheck(policy.net)
        chunk = policy.method.sample(net, cond, shape, self.steps, None, self.sampler, noise)
        action = (chunk - self.action_offset) / self.action_scale
        start = policy.n_obs_steps - 1
        action = action[:, start : start + policy.n_action_steps]
        if net.finite is None:  # a sampler that never called the network
            return action
        return torch.where(net.finite[:, None, None], action, torch.full_like(action, math.nan))


def draws_fresh_noise(policy: Policy, steps: int, sampler: str) -> bool:
    """Whether the sampler draws random numbers after the initial noise (it then cannot be one
    graph with the noise as its input): it is run once from given noise with the global torch
    generator as its only source, and checked for having drawn from it."""
    shape = (1, policy.horizon, policy.action_dim)
    cond = torch.zeros(1, policy.obs_encoder.out_dim)
    z = torch.zeros(shape)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        before = torch.get_rng_state()
        policy.method.sample(policy.net, cond, shape, steps, None, sampler, z)
        return not torch.equal(before, torch.get_rng_state())


def resolve_sampler(policy: Policy, steps: int | None, sampler: str | None) -> tuple[str, int]:
    """(sampler kind, steps) to export, refusing samplers that draw noise after the initial
    noise, with a hint at a setting of the same method that does not."""
    method = policy.method
    kind = method.resolve_sampler(sampler)
    steps = method.resolve_steps(steps)
    if draws_fresh_noise(policy, steps, kind):
        others = [(k, steps) for k in method.samplers if k != kind] + [(kind, 1)] * (steps > 1)
        fine = [(k, n) for k, n in others if not draws_fresh_noise(policy, n, k)]
        hint = (
            f"; export a deterministic setting instead: sampler={fine[0][0]} steps={fine[0][1]}"
            if fine
            else ""
        )
        raise ValueError(
            f"cannot export method {method.name} with sampler {kind!r} and steps={steps}: it "
            f"draws fresh noise at every step, after the initial noise, so its actions are not "
            f"a function of the graph's inputs{hint}"
        )
    return kind, steps


def export_metadata(
    policy: Policy, sampler: str, steps: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON metadata stored in the model (``metadata_props["cm_policy"]``)."""
    from cm_policy.tasks import load_task

    task = policy.spec["task"]
    observations = {k: {"shape": [d], "dtype": LOW_DIM_DTYPE} for k, d in policy.low_dim.items()}
    observations.update(
        {k: {"shape": list(s), "dtype": IMAGE_DTYPE} for k, s in policy.image_shapes.items()}
    )
    normalizer = {}
    for key in [*policy.low_dim, "action"]:
        scale, offset = scale_offset(policy, key)
        normalizer[key] = {"scale": scale.numpy().tolist(), "offset": offset.numpy().tolist()}
    return {
        "format": METADATA_FORMAT,
        "cm_policy_version": cm_policy_version(),
        "task": task.get("name"),
        "observations": observations,
        "inputs": [*observations, NOISE],
        "noise": {"name": NOISE, "shape": [policy.horizon, policy.action_dim]},
        "output": ACTION,
        "action_dim": policy.action_dim,
        "horizon": policy.horizon,
        "n_obs_steps": policy.n_obs_steps,
        "n_action_steps": policy.n_action_steps,
        "control_hz": load_task(task).control_hz,
        "method": policy.method.name,
        "sampler": sampler,
        "sampler_label": policy.method.label(sampler, steps),
        "steps": steps,
        "normalizer": normalizer,
        "spec": policy.spec,
        **(extra or {}),
    }


def example_inputs(policy: Policy, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs of the graph's shapes and dtypes (observation windows, then the noise)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = [
        torch.rand(batch, policy.n_obs_steps, d, generator=gen) for d in policy.low_dim.values()
    ]
    inputs += [
        torch.randint(0, 256, (batch, policy.n_obs_steps, *shape), generator=gen).to(torch.uint8)
        for shape in policy.image_shapes.values()
    ]
    inputs.append(torch.randn(batch, policy.horizon, policy.action_dim, generator=gen))
    return tuple(inputs)


EXPORTERS = ("auto", "dynamo", "torchscript")
# The largest difference between ONNX Runtime's and torch's actions (in normalised units, where
# the training range of each action dimension is [-1, 1]) that an export accepts when it checks
# the written model; float rounding gives about 1e-6 per network evaluation.
VERIFY_TOLERANCE = 1e-4
VERIFY_BATCHES = (1, 3)  # batch sizes other than the tracing example's (2): dynamic batch


def _trace(
    graph: ActionGraph, inputs: tuple[torch.Tensor, ...], names: list[str], opset: int, how: str
) -> Any:
    """The ONNX ModelProto of ``graph`` from one exporter (``dynamo`` or ``torchscript``)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings: the check below rules
        if how == "torchscript":
            path = Path(tmp) / "graph.onnx"
            torch.onnx.export(
                graph,
                inputs,
                str(path),
                input_names=names,
                output_names=[ACTION],
                opset_version=opset,
                dynamo=False,
                dynamic_axes={name: {0: "batch"} for name in [*names, ACTION]},
            )
            return onnx.load(str(path))
        batch = torch.export.Dim("batch", min=1, max=4096)
        logger = logging.getLogger("torch.onnx")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                graph,
                inputs,
                input_names=names,
                output_names=[ACTION],
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
                dynamic_shapes=(tuple({0: batch} for _ in names),),  # forward(*inputs)
                artifacts_dir=tmp,
            )
        finally:
            logger.setLevel(level)
        assert program is not None
        return program.model_proto


def verify(
    graph: ActionGraph, model_bytes: bytes, batches: tuple[int, ...] = VERIFY_BATCHES
) -> float:
    """The largest |ONNX Runtime - torch| of the actions (normalised units) on random inputs at
    ``batches``; raises a ValueError above :data:`VERIFY_TOLERANCE`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    worst = 0.0
    for batch in batches:
        inputs = example_inputs(graph.policy, batch, seed=batch)
        with torch.no_grad():
            expected = graph(*inputs).numpy()
        feeds = {name: x.numpy() for name, x in zip([*graph.keys, NOISE], inputs, strict=True)}
        got = session.run([ACTION], {k: v for k, v in feeds.items() if k in names})[0]
        if got.shape != expected.shape:
            raise ValueError(
                f"the exported graph returns shape {got.shape} at batch {batch}, torch "
                f"{expected.shape}"
            )
        scale = graph.action_scale.numpy()
        worst = max(worst, float(np.max(np.abs(got - expected) * np.abs(scale))))
    if not worst <= VERIFY_TOLERANCE:
        raise ValueError(
            f"the exported graph's actions differ from torch's by {worst:.3g} (normalised "
            f"units; tolerance {VERIFY_TOLERANCE:g}) at batch sizes {batches}"
        )
    return worst


def export_policy(
    policy: Policy,
    out: str | Path,
    *,
    steps: int | None = None,
    sampler: str | None = None,
    opset: int = OPSET,
    exporter: str = "auto",
    extra_metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``policy``'s ``predict_action`` (headline sampler unless ``sampler``/``steps``) as
    an ONNX model at ``out``; returns the metadata stored in it.

    ``exporter``: ``dynamo`` (torch.export), ``torchscript`` (tracing; deprecated by torch but
    it follows any Python code of a sampler), or ``auto``: dynamo, and tracing where torch.export
    cannot capture the sampler (iCT's and DDIM's take Python numbers from tensors). Whichever
    wrote it, the model is run in ONNX Runtime at batch sizes 1 and 3 and compared with torch
    before it is saved (:func:`verify`).
    """
    require_onnx_extra()
    import onnx

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {list(EXPORTERS)}, got {exporter!r}")
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    policy = policy.cpu().eval()
    kind, steps = resolve_sampler(policy, steps, sampler)
    keys = [*policy.low_dim, *policy.image_keys]
    if NOISE in keys or ACTION in keys:
        raise ValueError(f"observation keys {keys} clash with the graph's {NOISE!r}/{ACTION!r}")
    graph = ActionGraph(policy, steps, kind).eval()
    names = [*keys, NOISE]
    inputs = example_inputs(policy)
    if exporter == "auto":
        try:
            model, used = _trace(graph, inputs, names, opset, "dynamo"), "dynamo"
        except Exception as exc:  # torch.export could not capture it: trace it instead
            logging.getLogger(__name__).info("torch.export failed (%s); tracing instead", exc)
            model, used = _trace(graph, inputs, names, opset, "torchscript"), "torchscript"
    else:
        model, used = _trace(graph, inputs, names, opset, exporter), exporter
    ops = {node.op_type for node in model.graph.node}
    for function in model.functions:
        ops |= {node.op_type for node in function.node}
    if ops & RANDOM_OPS:
        raise ValueError(f"the exported graph draws random numbers ({sorted(ops & RANDOM_OPS)})")
    worst = verify(graph, model.SerializeToString())
    meta = export_metadata(policy, kind, steps, extra_metadata)
    meta.update(
        {
            "opset": opset,
            "exporter": used,
            "torch_version": torch.__version__,
            "verified_max_abs_diff": worst,
        }
    )
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(meta)})
    model.doc_string = (
        f"cm-policy {meta['method']} policy ({meta['sampler_label']}): raw observation windows "
        f"and initial noise in, raw actions out; metadata_props[{METADATA_KEY!r}] holds the spec"
    )
    onnx.checker.check_model(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, model.SerializeToString())
    return meta


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    weights: str = "ema",
    steps: int | None = None,
    sampler: str | None = None,
    opset: int = OPSET,
    exporter: str = "auto",
) -> dict[str, Any]:
    """Export the policy of a checkpoint (run, checkpoints or checkpoint folder)."""
    from cm_policy.checkpoint import load_policy, resolve_checkpoint

    require_onnx_extra()  # before loading the checkpoint: nothing can be exported without it

    folder = resolve_checkpoint(checkpoint, weights)
    policy = load_policy(folder, weights=weights, device="cpu")
    extra = {"checkpoint": str(folder), "weights": weights}
    return export_policy(
        policy,
        out,
        steps=steps,
        sampler=sampler,
        opset=opset,
        exporter=exporter,
        extra_metadata=extra,
    )
