#!/usr/bin/env bash
# The one set-up command: torch (CPU or CUDA build), then mmkernels editable with its extras.
#
#   bash scripts/install.sh                 # PYTHON=python3.11 bash scripts/install.sh for another interpreter
#   EXTRAS=dev,hf,bench,timm bash scripts/install.sh   # extras (default dev,hf,bench: tests, the HF
#                                                      # integration, `mmkernels bench --plot` and rich tables)
#   EXTRAS= bash scripts/install.sh        # no extras: mmkernels and its runtime dependencies only
#
# Idempotent: what is already installed is kept, and a second run takes about a second.
# Never runs nvidia-smi: a GPU is detected from the driver's device nodes.  The CUDA extension
# (csrc/) is built only with a GPU and nvcc present (see setup.py); MMKERNELS_SKIP_CUDA_BUILD=1
# or MMKERNELS_FORCE_CUDA=1 in the environment take precedence.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
EXTRAS="${EXTRAS-dev,hf,bench}"   # set and empty: no extras
TORCH_VERSION="${MMKERNELS_TORCH_VERSION:-2.13.0}"
STAMP="$REPO/build/.install-stamp"

log() { echo "install.sh: $*" >&2; }
pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }
# An attempt with a fallback after it: pip's output shows live, except its "ERROR:" lines (a missing
# wheel is what the next attempt is for; one "install.sh:" line says which), so a successful install
# prints no ERROR. The last attempt runs with pip_install: its errors are the real ones.
try_pip_install() {
    local out rc why
    out="$(mktemp)"
    pip_install "$@" 2>&1 | tee "$out" | grep -v '^ERROR: ' >&2
    rc=${PIPESTATUS[0]}
    if (( rc != 0 )); then
        why="$(grep -m1 '^ERROR: ' "$out" | sed 's/^ERROR: //')"
        log "(that did not work: ${why:-pip exit code $rc})"
    fi
    rm -f "$out"
    return "$rc"
}

command -v "$PY" >/dev/null 2>&1 || { log "no Python interpreter '$PY' (set PYTHON=...)"; exit 1; }
"$PY" -m pip --version >/dev/null 2>&1 || { log "'$PY -m pip' does not work; install pip first"; exit 1; }

has_gpu() { [[ -e /dev/nvidiactl || -e /proc/driver/nvidia/version ]]; }

# 1. torch ------------------------------------------------------------------------------
if torch_version="$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null)"; then
    log "torch $torch_version already installed: kept"
elif has_gpu; then
    log "NVIDIA driver found: installing torch (CUDA build)"
    pip_install torch
else
    log "no NVIDIA GPU visible: installing the CPU build of torch $TORCH_VERSION"
    # The default index would pull the CUDA build and its GBs of nvidia-* wheels. So: a local
    # wheel from pip's find-links with nothing else to fetch; else the local "+cpu" wheel with
    # its small dependencies from the index; else PyTorch's CPU index.
    if ! try_pip_install --no-index "torch==$TORCH_VERSION"; then
        log "(no local torch wheel with all its dependencies: trying torch==$TORCH_VERSION+cpu)"
        if ! try_pip_install "torch==$TORCH_VERSION+cpu"; then
            log "(no torch==$TORCH_VERSION+cpu on the configured indexes: trying PyTorch's CPU index)"
            pip_install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
        fi
    fi
fi

# 2. build tools for --no-build-isolation (pip must not fetch torch into an isolated build env)
if ! "$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)" >/dev/null 2>&1 \
    || ! "$PY" -c "import wheel" >/dev/null 2>&1; then
    log "installing setuptools>=64 and wheel"
    pip_install "setuptools>=64" wheel
fi

# 3. the CUDA extension is built only with a GPU and nvcc ----------------------------------
if [[ -z "${MMKERNELS_SKIP_CUDA_BUILD:-}" && "${MMKERNELS_FORCE_CUDA:-}" != "1" ]]; then
    if ! has_gpu || ! "$PY" -c "import sys, torch.utils.cpp_extension as c; sys.exit(c.CUDA_HOME is None)" >/dev/null 2>&1; then
        export MMKERNELS_SKIP_CUDA_BUILD=1
    fi
fi

# 4. mmkernels itself, editable, with the extras -----------------------------------------
# Skipped when this checkout is already installed with the same pyproject.toml/setup.py/csrc
# and build switches, and every extra's requirements import (a fresh clone reinstalls).
fingerprint() {
    {
        echo "$PY $EXTRAS ${MMKERNELS_SKIP_CUDA_BUILD:-} ${MMKERNELS_FORCE_CUDA:-} ${TORCH_CUDA_ARCH_LIST:-}"
        cat "$REPO/pyproject.toml" "$REPO/setup.py"
        ls -l "$REPO"/csrc/ 2>/dev/null || true
        cat "$REPO"/csrc/*.cu "$REPO"/csrc/*.cpp "$REPO"/csrc/*.h 2>/dev/null || true
    } | cksum
}
installed_here() {
    (cd / && "$PY" - "$REPO" <<'EOF'
import importlib.metadata as md, os, sys
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
repo = os.path.realpath(sys.argv[1])
import json
# an editable install of this very checkout (PEP 610 direct_url.json), read without importing torch
url = json.loads(md.distribution("mmkernels").read_text("direct_url.json") or "{}")
if not url.get("dir_info", {}).get("editable") or os.path.realpath(url.get("url", "")[len("file://"):]) != repo:
    sys.exit(1)
extras = [""] + [e for e in os.environ.get("EXTRAS", "").split(",") if e]
for line in md.requires("mmkernels") or []:
    req = Requirement(line)
    if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras):
        md.version(req.name)  # raises PackageNotFoundError when missing
EOF
    ) >/dev/null 2>&1
}
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(fingerprint)" ]] && EXTRAS="$EXTRAS" installed_here; then
    log "mmkernels already installed from $REPO: kept"
else
    log "installing mmkernels from $REPO (editable, extras: ${EXTRAS:-none})"
    (cd "$REPO" && pip_install --no-build-isolation -e ".${EXTRAS:+[$EXTRAS]}")
    mkdir -p "$(dirname "$STAMP")"
    fingerprint > "$STAMP"
fi
log "done: try 'python -m mmkernels info' and 'bash scripts/test.sh'"
