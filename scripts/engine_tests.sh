#!/usr/bin/env bash
# mmkernels inside the serving engines, on CPU: builds (or reuses) one venv per engine, outside
# the repository, and runs tests/test_engine_plugins.py in each (docs/engines.md).
#
#   bash scripts/engine_tests.sh                 # both engines
#   ENGINES=vllm bash scripts/engine_tests.sh    # one (vllm | sglang)
#   REBUILD=1 bash scripts/engine_tests.sh       # rebuild the venvs from scratch
#   bash scripts/engine_tests.sh -x -k tower     # extra arguments go to pytest
#   SHARED=1 bash scripts/engine_tests.sh        # both engines from one venv ($MMK_ENGINE_VENVS/engines:
#                                                # one torch install, what .ci/run builds)
#   BUILD_ONLY=1 bash scripts/engine_tests.sh    # build (or check) the venvs, run nothing
#
# Venvs: $MMK_ENGINE_VENVS/{vllm,sglang} (default /work/venvs), reused while this script's recipe
# for them is unchanged (a stamp file holds its hash); the mmkernels checkout is installed
# editable into each (re-done when the checkout's path changes).  Measured on this project's
# shared 2-core CPU machine, other jobs running, pip's cache warm: building the vLLM venv 472 s
# (3.3 GB; that included deleting an older one) and the SGLang venv 233 s (3.0 GB); the tests
# 128 s (vLLM: 16 passed) and 74 s (SGLang: 13 passed), plus about 30 s of imports each.
#
# How the venvs are built (why they are not `pip install vllm`):
# * torch 2.13.0's CPU build first (the local wheel pip finds here; the engines pin torch 2.14
#   and would bring several GB of CUDA packages), then the engine with --no-deps and the pure
#   Python packages it imports, under a constraint that keeps that torch;
# * PyPI's torchvision (which transformers' Qwen2-VL image processor imports) is a CUDA build
#   whose C++ ops cannot load with CPU torch: it still imports, except that it registers fake
#   kernels for two ops it never defined; a .pth shim in the venv defines their schemas first
#   (mmk_torchvision_cpu_shim, written below; inactive with a CUDA torch);
# * triton 3.9 (the interpreter runs mmkernels' kernels on CPU tensors: TRITON_INTERPRET=1 is set
#   by tests/conftest.py) and pytest.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3.11}"
VENVS="${MMK_ENGINE_VENVS:-/work/venvs}"
ENGINES="${ENGINES:-vllm sglang}"
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0   # torch 2.13's torchvision
TRITON_VERSION=3.9.0

VLLM_VERSION=0.33.0
VLLM_DEPS=(
    regex cachetools psutil sentencepiece numpy requests tqdm blake3 py-cpuinfo "transformers==5.19.0"
    huggingface_hub tokenizers safetensors protobuf "fastapi>=0.133.0,<0.137.0" aiohttp openai pydantic orjson
    prometheus_client pillow prometheus-fastapi-instrumentator tiktoken "lark==1.2.2" typing_extensions filelock
    partial-json-parser jsonschema pyzmq msgspec mistral_common einops "depyf==0.20.0" cloudpickle watchfiles
    python-json-logger pybase64 cbor2 ijson setproctitle anthropic pyyaml uvloop oss-harmony xgrammar llguidance
)
SGLANG_VERSION=0.5.23
SGLANG_DEPS=(
    aiohttp anthropic "blobfile==3.0.0" build datasets distro easydict einops fastapi gguf interegular IPython
    msgspec ninja numpy "openai==2.8.0" orjson packaging partial_json_parser pillow prometheus-client psutil
    pybase64 pydantic python-dateutil python-multipart pyzmq regex requests scipy "sentencepiece==0.2.1"
    setproctitle tiktoken tqdm "transformers==5.19.0" uvicorn uvloop watchfiles xxhash zstandard pyyaml
    huggingface_hub safetensors cloudpickle "apache-tvm-ffi==0.1.11" compressed-tensors
)
COMMON_DEPS=("triton==$TRITON_VERSION" pytest)

log() { echo "engine_tests.sh: $*" >&2; }
command -v "$PY" >/dev/null 2>&1 || { log "no interpreter '$PY' (set PYTHON=...)"; exit 1; }

write_torchvision_shim() {  # $1 = site-packages
    cat >"$1/mmk_torchvision_cpu_shim.py" <<'PYEOF'
"""Written by mmkernels' scripts/engine_tests.sh into its engine-test venvs only.  PyPI's
torchvision is a CUDA build whose C++ ops cannot load with torch's CPU build; torchvision then
still imports (its Python transforms work) except that it registers fake kernels for two ops it
never defined.  Defining their schemas when torchvision is first imported lets it import."""
import sys


class _Finder:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch

            if torch.version.cuda is not None:  # a CUDA torch loads torchvision's own ops
                return None
            for op in ("nms", "qnms"):
                try:
                    torch.library.define(f"torchvision::{op}",
                                         "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                except RuntimeError:
                    pass
        return None


sys.meta_path.insert(0, _Finder())
PYEOF
    echo "import mmk_torchvision_cpu_shim" >"$1/mmk_torchvision_cpu_shim.pth"
}

build_venv() {  # $1 = engine: vllm | sglang | engines (both engines in one venv: CI's build)
    local engine="$1" venv="$VENVS/$1" version deps pin
    local pkgs=()
    if [[ "$engine" == vllm ]]; then version="$VLLM_VERSION"; deps=("${VLLM_DEPS[@]}"); pkgs=("vllm==$version")
    elif [[ "$engine" == sglang ]]; then version="$SGLANG_VERSION"; deps=("${SGLANG_DEPS[@]}")
        pkgs=("sglang==$version")
    else version="$VLLM_VERSION+$SGLANG_VERSION"; pkgs=("vllm==$VLLM_VERSION" "sglang==$SGLANG_VERSION")
        # one openai for both: vLLM 0.33 imports names that SGLang's pin (2.8.0) lacks; SGLang's
        # vision code runs with vLLM's (tested)
        mapfile -t deps < <(printf '%s\n' "${VLLM_DEPS[@]}" "${SGLANG_DEPS[@]}" | grep -v '^openai==' | sort -u); fi
    local recipe
    recipe="$(printf '%s\n' "$engine" "$version" "$TORCH_VERSION" "$TORCHVISION_VERSION" "${deps[@]}" \
        "${COMMON_DEPS[@]}" "$(declare -f write_torchvision_shim)" | sha256sum | cut -c1-16)"
    local stamp="$venv/.mmk-recipe"
    if [[ -z "${REBUILD:-}" && -f "$stamp" && "$(cat "$stamp")" == "$recipe" ]]; then
        log "$engine: reusing $venv"
    else
        log "$engine: building $venv (recipe $recipe)"
        local t0=$SECONDS
        rm -rf "$venv"
        mkdir -p "$VENVS"
        "$PY" -m venv "$venv"
        local pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
        pin="$venv/.mmk-torch-constraint.txt"
        echo "torch==$TORCH_VERSION" >"$pin"
        "${pip[@]}" "torch==$TORCH_VERSION" 2>&1 | { grep -v "^WARNING: Location" || true; }
        "$venv/bin/python" -c "import torch; print('engine_tests.sh: torch', torch.__version__, \
'(CPU build)' if torch.version.cuda is None else '(CUDA build)')"
        "${pip[@]}" --no-deps "torchvision==$TORCHVISION_VERSION" 2>&1 | { grep -v "^WARNING: Location" || true; }
        write_torchvision_shim "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        "${pip[@]}" --no-deps "${pkgs[@]}" 2>&1 | { grep -v "^WARNING: Location" || true; }
        # the engines pin another torch: their dependencies are installed without it
        # (pip then lists the engine's own pins that stay unmet on purpose: torch 2.14, ...)
        "${pip[@]}" -c "$pin" "${deps[@]}" "${COMMON_DEPS[@]}" 2>&1 \
            | { grep -Ev "^(WARNING: Location|ERROR: pip's dependency resolver|This behaviour is the source|(vllm|sglang) [0-9.]+ requires )" \
                || true; }
        "$venv/bin/python" -c "import torch; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__"
        echo "$recipe" >"$stamp"
        rm -f "$venv/.mmk-repo"
        log "$engine: built in $((SECONDS - t0)) s, $(du -sh "$venv" | cut -f1)"
    fi
    if [[ "$(cat "$venv/.mmk-repo" 2>/dev/null)" != "$REPO" ]]; then
        # editable: the entry points (pyproject.toml) are registered for this checkout
        MMKERNELS_SKIP_CUDA_BUILD=1 "$venv/bin/python" -m pip install --disable-pip-version-check -q \
            --no-deps --no-build-isolation -e "$REPO"
        echo "$REPO" >"$venv/.mmk-repo"
    fi
}

status=0
summary=()
MMK_ENGINE_FIGURES="$(mktemp /tmp/mmk-engine-figures.XXXXXX)"
export MMK_ENGINE_FIGURES
trap 'rm -f "$MMK_ENGINE_FIGURES"' EXIT
for engine in $ENGINES; do
    case "$engine" in vllm|sglang) ;; *) log "unknown engine '$engine' (vllm | sglang)"; exit 2;; esac
    t0=$SECONDS
    if [[ "${SHARED:-0}" == 1 ]]; then venv_name=engines; else venv_name="$engine"; fi
    build_venv "$venv_name"
    venv="$VENVS/$venv_name"
    if [[ "${BUILD_ONLY:-0}" == 1 ]]; then summary+=("$engine: venv $venv ready"); continue; fi
    version="$("$venv/bin/python" -c "from importlib.metadata import version; print(version('$engine'))")"
    log "$engine $version: python -m pytest tests/test_engine_plugins.py -k $engine"
    set +e
    (cd "$REPO" && VLLM_TARGET_DEVICE=cpu "$venv/bin/python" -m pytest tests/test_engine_plugins.py -k "$engine" \
        -p no:cacheprovider -q -rs "$@")
    rc=$?
    set -e
    (( rc == 0 )) || status=1
    summary+=("$engine $version: pytest exit $rc, $((SECONDS - t0)) s (venv $(du -sh "$venv" | cut -f1))")
done
echo
if [[ -s "$MMK_ENGINE_FIGURES" ]]; then
    echo "engine_tests.sh: figures (float32 on CPU, Triton interpreter; error = max |output - float64 tower|):"
    sed 's/^/  /' "$MMK_ENGINE_FIGURES"
fi
printf 'engine_tests.sh: %s\n' "${summary[@]}"
exit "$status"
