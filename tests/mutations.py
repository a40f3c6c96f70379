"""Deliberate mistakes in the methods, each of which the tests must catch.

    python tests/mutations.py [--tests tests/test_method_math.py tests/test_methods.py]

Each mutation is applied to a copy of the package (``cm_policy/``, ``config/`` and ``tests/`` in a
temporary folder beside the checkout, so ``../shared`` still resolves; the tests run there, the
copy first on ``sys.path``), and the tests that failed are listed; the checkout itself is never
edited. Exits non-zero when a mutation survives (no test red)
or when a mutation no longer applies (its line changed: update the list).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (what the mistake is, file, the exact text, its replacement)
MUTATIONS = [
    (
        "iSD: the sign of the target's derivative term",
        "cm_policy/methods/isd.py",
        "target = v_hat - (ts - ss).view(-1, 1, 1) * d",
        "target = v_hat + (ts - ss).view(-1, 1, 1) * d",
    ),
    (
        "iSD: t and s swapped in the target",
        "cm_policy/methods/isd.py",
        "target = v_hat - (ts - ss).view(-1, 1, 1) * d",
        "target = v_hat - (ss - ts).view(-1, 1, 1) * d",
    ),
    (
        "iSD: t and s swapped in the derivative's evaluations",
        "cm_policy/methods/isd.py",
        "torch.cat([x1, x2]), torch.cat([t1, t2]), torch.cat([s, s]),",
        "torch.cat([x1, x2]), torch.cat([s, s]), torch.cat([t1, t2]),",
    ),
    (
        "iSD: the stop-gradient removed from v_hat",
        "cm_policy/methods/isd.py",
        "v_hat = f_diag[:k].detach()",
        "v_hat = f_diag[:k]",
    ),
    (
        "iSD one-sided difference: divided by 2 eps",
        "cm_policy/methods/isd.py",
        "return (ahead - centre.detach()) / eps",
        "return (ahead - centre.detach()) / (2 * eps)",
    ),
    (
        "iSD one-sided difference: the step without the velocity shift",
        "cm_policy/methods/isd.py",
        "ahead = model(x + shift, t + eps, s, cond)",
        "ahead = model(x, t + eps, s, cond)",
    ),
    (
        "iSD one-sided difference: centred on the diagonal instead of the jump",
        "cm_policy/methods/isd.py",
        "d = self.time_derivative(model, xs, ts, ss, cs, v_hat, centre=f_jump)",
        "d = self.time_derivative(model, xs, ts, ss, cs, v_hat, centre=f_diag[:k])",
    ),
    (
        "iSD jvp_primal: the primal's gradient detached",
        "cm_policy/methods/isd.py",
        "return primal, tangent.detach()",
        "return primal.detach(), tangent.detach()",
    ),
    (
        "iSD jvp_primal: the tangent keeps its gradient",
        "cm_policy/methods/isd.py",
        "return primal, tangent.detach()",
        "return primal, tangent",
    ),
    (
        "iSD jvp_primal: the tangent without its time component",
        "cm_policy/methods/isd.py",
        "(x, t), (velocity, torch.ones_like(t))\n        )\n        return primal",
        "(x, t), (velocity, torch.zeros_like(t))\n        )\n        return primal",
    ),
    (
        "iSD jvp_primal: the jump evaluated on the diagonal (s = t)",
        "cm_policy/methods/isd.py",
        "f_jump, d = self.jump_and_derivative(model, xs, ts, ss, cs, v_hat)",
        "f_jump, d = self.jump_and_derivative(model, xs, ts, ts, cs, v_hat)",
    ),
    (
        "iSD jvp_primal: no fallback to two passes under bf16 autocast",
        "cm_policy/methods/isd.py",
        "if torch.is_autocast_enabled(x.device.type):",
        "if False:",
    ),
    (
        "the adaptive weight's stop-gradient removed",
        "cm_policy/methods/base.py",
        "(per_sample / (per_sample.detach() + c).pow(p)).mean()",
        "(per_sample / (per_sample + c).pow(p)).mean()",
    ),
    (
        "MeanFlow: the tangent without its time component",
        "cm_policy/methods/meanflow.py",
        "(x_t, t), (v, torch.ones_like(t))",
        "(x_t, t), (v, torch.zeros_like(t))",
    ),
    (
        "DDPM: predicting the clean chunk instead of the noise",
        "cm_policy/methods/ddpm.py",
        "loss = (pred - noise).pow(2).mean()",
        "loss = (pred - actions).pow(2).mean()",
    ),
    (
        "flow matching: the velocity's sign",
        "cm_policy/methods/flow.py",
        "(model(x_t, t, t, cond) - (z - actions))",
        "(model(x_t, t, t, cond) - (actions - z))",
    ),
    (
        "iCT: the target without stop-gradient",
        "cm_policy/methods/ict.py",
        "        with torch.no_grad():\n            target = self.consistency(",
        "        if True:\n            target = self.consistency(",
    ),
    (
        "samplers: the time grid reversed",
        "cm_policy/methods/base.py",
        "grid = torch.linspace(1.0, 0.0, steps + 1, device=cond.device)",
        "grid = torch.linspace(0.0, 1.0, steps + 1, device=cond.device)",
    ),
]


def run(tests: list[str]) -> int:
    survived = 0
    for what, rel, old, new in MUTATIONS:
        with tempfile.TemporaryDirectory(dir=REPO.parent, prefix=".mutant_") as tmp:
            copy = Path(tmp)
            for part in ("cm_policy", "config", "tests"):
                shutil.copytree(REPO / part, copy / part)
            shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
            path = copy / rel
            text = path.read_text()
            if text.count(old) != 1:
                print(f"NOT APPLIED  {what}: {rel} holds {text.count(old)} copies of the line")
                survived += 1
                continue
            path.write_text(text.replace(old, new))
            env = {**os.environ, "PYTHONPATH": str(copy)}
            out = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests],
                cwd=copy,
                env=env,
                capture_output=True,
                text=True,
            )
            failed = re.findall(r"^FAILED (\S+)", out.stdout, flags=re.M)
            if failed:
                print(f"caught       {what}: {len(failed)} red, e.g. {failed[0].split('::')[-1]}")
                for name in failed:
                    print(f"               {name}")
            else:
                survived += 1
                print(f"SURVIVED     {what}")
    return survived


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tests",
        nargs="+",
        default=["tests/test_method_math.py", "tests/test_isd_derivatives.py"],
    )
    args = parser.parse_args()
    sys.exit(1 if run(args.tests) else 0)


if __name__ == "__main__":
    main()
