#!/usr/bin/env bash
# CI: the package as users install it. Builds the wheel, installs it (not editable) in a fresh
# venv in a temporary folder outside the repository, and from there trains a tiny PushT policy
# for 2 steps and evaluates it, so the configs must come from the wheel (cm_policy/_config).
#
# Environment: CM_POLICY_SHARED  the shared data folder (default: <repo>/../shared)
#              CM_POLICY_KEEP_TMP=1  keep the temporary folder (venv, wheel, run) for a look
set -euo pipefail
start=$SECONDS
REPO="$(cd "$(dirname "$0")/.." && pwd)"
SHARED="${CM_POLICY_SHARED:-$REPO/../shared}"
DATASET="$SHARED/data/pusht/pusht_cchi_v7_replay.zarr"
export SDL_VIDEODRIVER=dummy SDL_AUDIODRIVER=dummy

fail() {
    echo "wheel_check: FAIL: $*" >&2
    exit 1
}
[[ -d $DATASET ]] || fail "no dataset at $DATASET (set CM_POLICY_SHARED to the shared folder)"
DATASET="$(cd "$DATASET" && pwd)"
# Builds with the repository's venv (.ci/run makes it) when there is one.
PY=python3
[[ -x $REPO/.venv/bin/python ]] && PY="$REPO/.venv/bin/python"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/cm-policy-wheel.XXXXXX")"
TMP="$(cd "$TMP" && pwd -P)"
phase="setup"
finish() {
    local rc=$?
    if [[ ${CM_POLICY_KEEP_TMP:-0} == 1 ]]; then
        echo "wheel_check: kept $TMP" >&2
    else
        rm -rf "$TMP"
    fi
    if ((rc)); then
        echo "wheel_check: FAILED during '$phase' (exit $rc) after $((SECONDS - start)) s" >&2
    else
        echo "wheel_check: OK in $((SECONDS - start)) s (the fresh venv's removal included)"
    fi
}
trap finish EXIT
case "$TMP/" in "$(cd "$REPO" && pwd -P)"/*) fail "temporary folder $TMP is inside the repository" ;; esac
step() {
    phase="$1"
    echo "wheel_check: [$((SECONDS - start)) s] $1"
}

# Build from a copy of the working tree (git-ignored and build outputs left out), so that no
# build/ or stale build/lib files of an earlier build in the repository end up in the wheel.
step "build the wheel"
mkdir "$TMP/src" "$TMP/dist"
tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
    --exclude=./data --exclude=./outputs --exclude=./runs --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache -cf - . |
    tar -C "$TMP/src" -xf -
"$PY" -m pip wheel -q --no-deps -w "$TMP/dist" "$TMP/src"
shopt -s nullglob globstar
wheels=("$TMP"/dist/cm_policy-*.whl)
((${#wheels[@]} == 1)) || fail "expected one cm_policy wheel in $TMP/dist, found ${#wheels[@]}"
WHEEL="${wheels[0]}"

step "check the wheel's files"
# Every module of cm_policy/ and every yaml of config/ (as cm_policy/_config/...) must be in it:
# pyproject.toml lists the packages by hand, and new config groups must be shipped too.
"$PY" - "$WHEEL" "$TMP/src" <<'EOF'
import sys
import zipfile
from pathlib import Path

wheel, src = sys.argv[1], Path(sys.argv[2])
names = set(zipfile.ZipFile(wheel).namelist())
want = {p.relative_to(src).as_posix() for p in (src / "cm_policy").rglob("*.py")}
want |= {
    "cm_policy/_config/" + p.relative_to(src / "config").as_posix()
    for p in (src / "config").rglob("*.yaml")
}
want |= {"cm_policy/_config/config.yaml", "cm_policy/_config/task/pusht_keypoints.yaml"}
missing = sorted(want - names)
if missing:
    sys.exit(f"wheel_check: FAIL: {Path(wheel).name} lacks {len(missing)} files: {missing}")
n_cfg = sum(n.startswith("cm_policy/_config/") for n in names)
print(f"wheel_check: {Path(wheel).name}: {len(names)} files, {n_cfg} under cm_policy/_config/")
EOF

step "install torch and the wheel in a fresh venv"
python3 -m venv "$TMP/venv"
V="$TMP/venv/bin"
# torch first, the on-disk CPU build as .ci/run installs it, so the wheel's torch range is met and
# pip pulls no CUDA build. --no-compile: no .pyc for all of torch (faster to install and remove).
"$V/pip" install -q --no-compile torch==2.13.0
"$V/pip" install -q --no-compile "$WHEEL"

# From the temporary folder, without PYTHONPATH: nothing of the repository is importable here.
cd "$TMP"
unset PYTHONPATH
step "check the installed package"
"$V/python" - "$TMP/venv" <<'EOF'
import sys
from pathlib import Path

import torch

import cm_policy
from cm_policy.configs import config_dir

venv = Path(sys.argv[1])
pkg = Path(cm_policy.__file__).resolve().parent
site = sorted(venv.glob("lib/python*/site-packages"))
print(f"wheel_check: cm_policy at {pkg}, configs from {config_dir()}, torch {torch.__version__}")
if not site or pkg != site[0].resolve() / "cm_policy":
    sys.exit(f"wheel_check: FAIL: cm_policy imported from {pkg}, not from {venv}'s site-packages")
if config_dir().resolve() != pkg / "_config":
    sys.exit(f"wheel_check: FAIL: configs from {config_dir()}, not the wheel's {pkg / '_config'}")
if torch.__version__.split("+")[0] != "2.13.0":
    sys.exit(f"wheel_check: FAIL: installing the wheel replaced torch 2.13.0 by {torch.__version__}")
EOF

step "cm-policy train"
"$V/cm-policy" train task=pusht_keypoints task.dataset_path="$DATASET" model=unet_tiny \
    training.steps=2 training.batch_size=8 training.num_threads=1 training.warmup_steps=1 \
    output_dir="$TMP/run"
step "cm-policy eval"
before=("$TMP"/run/eval/**/metrics.json)  # none, unless training evaluated (eval_every)
"$V/cm-policy" eval checkpoint="$TMP/run" n_episodes=2 n_envs=1 n_videos=0 max_steps=20

step "check the eval's metrics.json"
metrics=("$TMP"/run/eval/**/metrics.json)
((${#metrics[@]} > ${#before[@]})) || fail "the eval wrote no metrics.json under $TMP/run/eval"
echo "wheel_check: wrote ${metrics[*]#"$TMP/"}"
step "remove the temporary folder"
