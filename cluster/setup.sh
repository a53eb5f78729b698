#!/usr/bin/env bash
# Node setup shared by every shipped `ray up` config (aws.yaml, gcp.yaml, onprem.yaml): their
# setup_commands run it on every node after file_mounts has synced this checkout to ~/weakseg.
#
#   bash ~/weakseg/cluster/setup.sh [PACKAGE...]     # extra packages, e.g. boto3 on AWS
#
# 1. A Python 3.11 venv at ~/weakseg-venv (kept if it exists; made with uv's own CPython, so the
#    image's python3 does not matter), activated in ~/.bashrc: every later command, `ray attach`
#    shell and `ray job submit` entrypoint runs inside it.
# 2. The pinned stack (cluster/constraints.txt, the versions the tests run) and this checkout,
#    editable: the cluster runs exactly the code you synced, and a re-sync needs no reinstall.
# 3. On a node with an NVIDIA GPU, a check that the driver can run the installed torch.
set -euo pipefail
SRC="$HOME/weakseg"
VENV="$HOME/weakseg-venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
    if [ ! -x "$HOME/.local/bin/uv" ]; then
        curl -LsSf https://astral.sh/uv/install.sh | sh
    fi
    "$HOME/.local/bin/uv" venv --seed --python 3.11 "$VENV"
fi
grep -q 'weakseg-venv/bin/activate' "$HOME/.bashrc" 2>/dev/null \
    || echo 'source ~/weakseg-venv/bin/activate' >> "$HOME/.bashrc"

PIP=("$VENV/bin/python" -m pip install --quiet -c "$SRC/cluster/constraints.txt")
# setuptools first, then weakseg without build isolation: the build uses the pinned setuptools.
"${PIP[@]}" setuptools
"${PIP[@]}" torch torchvision "ray[default,tune]" mlflow optuna "$@"
"${PIP[@]}" --no-build-isolation -e "$SRC"
"$VENV/bin/python" -c "import weakseg.cli, weakseg.search.run" \
    || { echo "setup.sh: weakseg does not import on $(hostname)" >&2; exit 1; }

if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
    "$VENV/bin/python" -c "
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f'setup.sh: torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use this GPU: the NVIDIA '
             'driver is too old for it (nvidia-smi shows its version); use an image with a newer driver')
print(f'setup.sh: torch {torch.__version__} sees {torch.cuda.device_count()} GPU(s)')
"
fi
