#!/usr/bin/env bash
# What a GPU device machine lacks, gathered here into .gpu/ (git-ignored through
# .git/info/exclude) for a device call to carry (`carry: [".gpu"]`, 64 MiB at most):
#
#   bash eval/gpu_prepare.sh [PYTHON] [EXTRA]
#
# - .gpu/whl/: wheels (CPython 3.12, x86-64) of this package's needs that the device image lacks
#   (it has torch, numpy, scipy, matplotlib, safetensors, msgpack, tqdm, opencv, h5py, pyarrow),
#   at the versions PYTHON (default .venv/bin/python) has. EXTRA=robomimic adds MuJoCo and
#   robosuite's needs, EXTRA=video PyAV (36 MB: videos), EXTRA=image writes .gpu/pusht_image.zarr,
#   the human PushT data with its images (32 MB; carry [".gpu/whl", ".gpu/pusht_image.zarr"]
#   for eval/gpu_image.sh: the tree that travels holds 64 MiB at most).
# - .gpu/pusht_cchi_v7_replay.zarr: the human PushT data without its images (keypoints, state,
#   action; 2 MB instead of 32), from ../shared beside the checkout, and .gpu/pusht_twogoal.zarr
#   likewise from data/pusht_twogoal.zarr where it was generated: the keypoint campaigns' data.
#
# On the device, eval/stage.sh's `use_wheels` installs .gpu/whl into /tmp/site and puts it and
# the checkout on PYTHONPATH (the package runs from the checkout, uninstalled).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
EXTRA=${2:-}
NAMES=(zarr numcodecs donfig google-crc32c typing-extensions pymunk cffi pycparser shapely
  gymnasium farama-notifications hydra-core omegaconf diffusers importlib-metadata websockets)
case "$EXTRA" in
  robomimic) NAMES+=(mujoco glfw pyopengl termcolor) ;;
  video) NAMES+=(av) ;;
  image | "") ;;
  *) echo "EXTRA: expected robomimic, video or image, got '$EXTRA'" >&2; exit 2 ;;
esac
mkdir -p .gpu/whl .git/info
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
for name in "${NAMES[@]}"; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}')
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/whl \
    "$name${version:+==$version}" 2>/dev/null
done
# Hydra's parser runtime is published as a source archive only: build its (pure Python) wheel.
version=$("$PY" -m pip show antlr4-python3-runtime | awk '/^Version:/{print $2}')
"$PY" -m pip wheel -q --no-deps -w .gpu/whl "antlr4-python3-runtime==$version"
# Low-dim copies of the campaigns' data sets, under their own names (what gpu_campaign.sh looks
# for): the human PushT data and, where it was generated, two-goal PushT.
lowdim() {  # lowdim SRC KEYS...
  local src=$1 out=.gpu/$(basename "$1")
  shift
  [ -d "$src" ] && [ ! -d "$out" ] || return 0
  "$PY" -c "import sys
from cm_policy.data import ReplayBuffer
ReplayBuffer.load(sys.argv[1], keys=sys.argv[3:]).save(sys.argv[2])" "$src" "$out" "$@"
}
lowdim ../shared/data/pusht/pusht_cchi_v7_replay.zarr keypoint state action
lowdim data/pusht_twogoal.zarr keypoint state action goal
if [ "$EXTRA" = image ] && [ ! -d .gpu/pusht_image.zarr ]; then
  cp -r ../shared/data/pusht/pusht_cchi_v7_replay.zarr .gpu/pusht_image.zarr
fi
ls .gpu .gpu/whl
du -sh .gpu
