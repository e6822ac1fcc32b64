#!/usr/bin/env bash
# gpu_check.sh — the one script every GPU-lent session runs on the device machine.
#
# Stages (MMK_STAGES, default "env build inspect tests bench summary"), each time-boxed so the whole
# script ends inside 9 minutes (MMK_TOTAL_S, default 530 s: the budget of one device call):
#   env      nvidia-smi summary, python/torch/triton/CUDA versions, optional packages  -> env.txt
#   build    the CUDA extension mmkernels._C from csrc/ (JIT, torch.utils.cpp_extension + ninja,
#            cached for the later stages, which then load it with MMKERNELS_JIT_BUILD=1 and
#            fail rather than skip its GPU tests: MMKERNELS_REQUIRE_CUDA_EXT=1); skipped when
#            csrc/ has no sources, nvcc is missing, or MMK_INSTALL=1 built it  -> appended to env.txt
#   inspect  `mmkernels inspect --arch 90 --default-only --json` under the device's triton (registers,
#            spills, shared memory, wgmma, cp.async/TMA, load widths of every kernel)  -> inspect.json
#   tests    the CUDA test subset that proves each kernel correct: python -m pytest tests -q
#            -m "not slow and not fuzz" (MMK_PYTEST_MARK), time box MMK_TEST_TIMEOUT_S (180 s) -> pytest.log
#   bench    `mmkernels bench <op> --json bench_<op>.json --resume` for each op of MMK_BENCH_OPS (default
#            "attention qformer_cross_attention token_pool attention_varlen": the README table and issue 22's
#            Qwen3-VL tower timings) with MMK_BENCH_ARGS, or per op by
#            default: attention "--preset sweep,blip2,llava-ov,gemma3 --mode fwd,fwd+bwd" (d 64/128/88
#            x L 512..16384 and the EVA / SigLIP model shapes vs every SDPA backend and Flex), qformer_cross_attention
#            "--preset blip2 --mode fwd,fwd+bwd" (B=64 both paths vs HF eager / sdpa), token_pool
#            "--preset gemma3,llava-ov" (GB/s), attention_varlen "--preset qwen3vl-tower --mode fwd --exclude
#            flex,sdpa-dense" (H=16, d=72, one packed sequence of S = 8836 / 15376 / 35344: packed triton,
#            triton-fp8 (fp8="dynamic"), triton-scores (return_scores) vs the dense dense-triton, dense-fp8,
#            sdpa-flash, sdpa-cudnn, flash-attn varlen, hf-loop; its file is folded into bench_attention.json
#            at the end: its "folded" entry, `fold unfold` below writes it back out; it runs on the time the
#            ops before it leave, not counted in their shares), vit_encoder
#            "--preset qwen25vl,qwen3vl" (not a default
#            op: at most 8 files come back; name it in MMK_BENCH_OPS. One Qwen2.5-VL / Qwen3-VL tower
#            forward's attention calls at 448x448, 1080p and a 32-frame video: sdpa-loop, sdpa-dense,
#            mk, triton, triton-graph = every layer in one CUDA graph, flash-attn and the engines'
#            backends where importable; its share capped at MMK_VIT_ENCODER_S, default 240 s);
#            rerun with --resume after a fatal CUDA error
#            (exit 3), a hung case (the --case-timeout-s watchdog, exit 1) or the hard box, so each
#            rerun skips the culprit; the ops share the time left; MMK_BENCH_PLOT=1 adds bench_<op>.png
#                                                                -> bench_<op>.json, bench.log
#   summary  pytest tail + every results table, printed last                            -> summary.txt
# Not in the default, for a call of their own:
#   suite    the pytest-benchmark suite at real sizes, gated against benchmarks/baselines/<device>.json
#            when one exists (scripts/perf_gate.sh)                              -> perf_<device>.json, bench.log
#   e2e      examples/blip2_e2e.py (issue 5: BLIP-2 and LLaVA-OneVision end to end, patched vs HF eager
#            vs HF sdpa); time box MMK_E2E_S (default: what is left, less 30 s); extra arguments in
#            MMK_E2E_ARGS (e.g. "--models blip2")                                    -> e2e.json, bench.log
# Examples (`run` tool, from the repo root; the copy there has no .git, so pass the commit in):
#   MMKERNELS_COMMIT=<sha> bash scripts/gpu_check.sh                         # tests + the attention sweep
#   MMKERNELS_COMMIT=<sha> MMK_STAGES="env bench summary" MMK_BENCH_OPS="attention qformer_cross_attention token_pool" \
#       MMK_BENCH_ARGS="--mode fwd,fwd+bwd --exclude flex" MMK_BENCH_PLOT=1 bash scripts/gpu_check.sh  # every op
#   MMKERNELS_COMMIT=<sha> MMK_STAGES="env build tests bench summary" MMK_BENCH_OPS=token_pool \
#       MMK_BENCH_ARGS= MMK_PYTEST_ARGS="-k token_pool" bash scripts/gpu_check.sh   # the token-pool benchmark
#   MMKERNELS_COMMIT=<sha> MMK_STAGES="env bench summary" MMK_BENCH_OPS=vit_encoder \
#       bash scripts/gpu_check.sh            # the vision-encoder forward per backend, graph-captured too (issue 17)
#   MMKERNELS_COMMIT=<sha> MMK_STAGES="env suite summary" bash scripts/gpu_check.sh  # the gate / a baseline
#   carry: [], timeout_s: 560. At most 8 files come back from $OUT, all flat: env.txt, inspect.json,
#   pytest.log, bench_attention.json (attention_varlen's results inside, "folded"), bench_qformer_cross_attention.json,
#   bench_token_pool.json, bench.log, summary.txt
#   (install.log with MMK_INSTALL=1 and the .png with MMK_BENCH_PLOT=1 are extra: use them in a call of their own).
# Continuing a benchmark in a second call (a fresh machine if the first went back): here
#   mkdir -p .gpu_prev && cp <files_at>/bench_attention.json .gpu_prev/ &&
#   (grep -qx '/.gpu_prev/' .git/info/exclude || echo /.gpu_prev/ >> .git/info/exclude)
#   then run with MMK_STAGES="bench summary" MMK_BENCH_PREV=.gpu_prev and carry [".gpu_prev"]:
#   its bench_<op>.json files are resumed (attention_varlen's from bench_attention.json's "folded" entry).
# Other knobs: MMK_TEST_TIMEOUT_S (default 240: the tests' share of the total), MMK_PYTEST_ARGS
#   (extra pytest arguments), MMK_CASE_TIMEOUT_S (default 300: the benchmark's per-case watchdog,
#   compilation and autotuning included), MMK_INSTALL=1 (pip install --no-deps --no-build-isolation
#   -e . instead of PYTHONPATH=.; builds the CUDA extension if setup.py does), PYTHON (default python3).
#
# Python packages: the 'cuda' image holds pytest, pytest-timeout, pytest-benchmark, hypothesis
# (.library/device/KINDS.md, 2026-11-17); the machine has no internet. If one is missing, carry
# wheels: here `echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps
# --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64
# -d .whl NAME==VERSION` (pure-Python wheels match any platform), then carry [".whl"]: this
# script installs .whl/*.whl into /tmp/site itself.
#
# Committing results (here, after the call; the files lie read-only under the reply's files_at):
#   cp <files_at>/bench_attention.json benchmarks/results/<device-slug>/attention_<yyyymmdd>_<commit7>.json
#   (the device slug is the JSON's device.slug); the folded attention_varlen results as their own file:
#   python3 -c 'import json,sys; json.dump(json.load(open(sys.argv[1]))["folded"]["attention_varlen"],
#   open(sys.argv[2], "w"), indent=1)' <files_at>/bench_attention.json <dir>/attention_varlen_<yyyymmdd>_<commit7>.json;
#   commit it with the pytest summary line and the device
#   (kind, driver from env.txt) in the message.
set -uo pipefail

T0=$SECONDS
TOTAL=${MMK_TOTAL_S:-530}
STAGES=" ${MMK_STAGES:-env build inspect tests bench summary} "
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET          # real kernels on the GPU; tests/conftest.py sets it only without CUDA
remaining() { echo $(( TOTAL - (SECONDS - T0) )); }
has_stage() { [[ "$STAGES" == *" $1 "* ]]; }
note() { echo "[gpu_check +$((SECONDS - T0))s] $*"; }
# `timeout` from coreutils; without it, run unboxed rather than not at all
# (TBOX_SIG=INT for pytest: it then stops like on Ctrl-C, printing its summary and writing the junit xml)
tbox() { local t=$1; shift; if command -v timeout >/dev/null 2>&1; then timeout -s "${TBOX_SIG:-TERM}" -k 15 "$t" "$@"; else "$@"; fi; }

# ---- carried wheels (optional) ------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
    note "installing carried wheels from .whl/ into /tmp/site"
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        note "WARNING: installing .whl/*.whl failed; going on without them"
    fi
fi

# ---- mmkernels on the path ----------------------------------------------------------------
if [[ "${MMK_INSTALL:-0}" == "1" ]]; then
    note "pip install --no-deps --no-build-isolation -e . (log: install.log)"
    tbox 300 $PY -m pip install --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
        || note "WARNING: editable install failed (see install.log); falling back to PYTHONPATH=."
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# ---- env ----------------------------------------------------------------------------------
if has_stage env; then
    {
        echo "== date: $(date -u +%Y-%m-%dT%H:%M:%SZ)   commit: ${MMKERNELS_COMMIT:-unknown}"
        echo "== nvidia-smi"
        tbox 30 nvidia-smi 2>&1 || echo "(nvidia-smi failed)"
        tbox 30 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,temperature.gpu,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv 2>&1 || true
        echo "== python / packages"
        tbox 120 $PY - <<'EOF' 2>&1
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
          torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device", p.name, f"cc {p.major}.{p.minor}", "SMs", p.multi_processor_count,
              f"{p.total_memory / 2**30:.1f} GiB")
    else:
        print("torch sees NO CUDA device")
except Exception as exc:
    print("torch import failed:", repr(exc))
for name in ("triton", "pytest", "pytest_timeout", "pytest_benchmark", "hypothesis", "transformers",
             "timm", "flash_attn", "xformers", "vllm", "sglang", "mmkernels"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:<17}", getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except Exception as exc:
        print(f"{name:<17} MISSING ({type(exc).__name__}: {str(exc)[:120]})")
EOF
    } 2>&1 | tee "$OUT/env.txt"
fi

# ---- build: the CUDA extension (csrc/), once, for every later stage ------------------------
BUILD_RC=skipped
if has_stage build; then
    shopt -s nullglob
    csrc=(csrc/*.cu csrc/*.cpp)
    shopt -u nullglob
    if (( ${#csrc[@]} == 0 )); then
        note "build: csrc/ has no sources" | tee -a "$OUT/env.txt"
    elif $PY -c "import mmkernels._C" 2>/dev/null; then
        note "build: mmkernels._C is already importable (MMK_INSTALL=1 / setup.py build)" | tee -a "$OUT/env.txt"
        export MMKERNELS_REQUIRE_CUDA_EXT=1
        BUILD_RC=0
    elif ! command -v nvcc >/dev/null 2>&1 && [[ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
        note "build: no nvcc on this machine: the CUDA backend stays unavailable" | tee -a "$OUT/env.txt"
    elif ! $PY -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
        note "build: this torch is built without CUDA: the CUDA backend stays unavailable" | tee -a "$OUT/env.txt"
    else
        export MMKERNELS_JIT_BUILD=1
        note "build: JIT-building mmkernels._C from ${csrc[*]} (time box 300s)" | tee -a "$OUT/env.txt"
        t_build=$SECONDS
        MMKERNELS_JIT_VERBOSE=${MMKERNELS_JIT_VERBOSE:-1} tbox 300 $PY - <<'EOF' 2>&1 | tail -n 60 | tee -a "$OUT/env.txt"
import sys
from mmkernels import _ext
mod = _ext.load()
print("mmkernels._C:", mod.__file__ if mod is not None else None, "|", _ext.unavailable_reason() or "usable")
sys.exit(0 if mod is not None else 1)
EOF
        BUILD_RC=${PIPESTATUS[0]}
        note "build rc=$BUILD_RC in $((SECONDS - t_build))s" | tee -a "$OUT/env.txt"
        # later processes load the cached build (same sources: no rebuild); a build that worked
        # here and cannot load there is a failure, not a skip
        [[ "$BUILD_RC" == 0 ]] && export MMKERNELS_REQUIRE_CUDA_EXT=1
    fi
fi

# ---- inspect: what the GPU compiles, under this machine's triton ----------------------------
if has_stage inspect; then
    box=$(( $(remaining) - 400 )); (( box > 120 )) && box=120; (( box < 30 )) && box=30
    note "inspect (time box ${box}s): $PY -m mmkernels inspect --arch 90 --default-only --json"
    tbox "$box" $PY -m mmkernels inspect --arch 90 --default-only --json >"$OUT/inspect.json" 2>>"$OUT/env.txt" \
        || note "inspect rc=$? (see env.txt)" | tee -a "$OUT/env.txt"
fi

# ---- tests --------------------------------------------------------------------------------
TEST_RC=skipped
if has_stage tests; then
    if ! $PY -c "import pytest" 2>/dev/null; then
        note "pytest is not importable here: skipping tests (carry a pytest wheel in .whl/, see header)" \
            | tee "$OUT/pytest.log"
        TEST_RC=no-pytest
    else
        budget=${MMK_TEST_TIMEOUT_S:-180}
        if has_stage bench; then   # leave the benchmark at least ~4 minutes
            cap=$(( $(remaining) - 240 )); (( cap < budget )) && budget=$cap
        else
            cap=$(( $(remaining) - 20 )); (( cap < budget )) && budget=$cap
        fi
        (( budget < 30 )) && budget=30
        args=(tests -q -p no:cacheprovider --durations=15 -m "${MMK_PYTEST_MARK:-not slow and not fuzz}")
        # one hung test must not eat the whole box: per-test limit when pytest-timeout is there
        if $PY -c "import pytest_timeout" 2>/dev/null; then args+=(--timeout="${MMK_TEST_CASE_TIMEOUT_S:-120}"); fi
        note "pytest (time box ${budget}s): $PY -m pytest ${args[*]} ${MMK_PYTEST_ARGS:-}"
        # shellcheck disable=SC2086
        # MMKERNELS_AUTOTUNE=0: the tests' many small shapes use each kernel's default config
        # (one compile per specialisation) instead of autotuning every key; the bench tunes.
        MMKERNELS_AUTOTUNE=${MMKERNELS_AUTOTUNE:-0} TBOX_SIG=INT tbox "$budget" $PY -m pytest "${args[@]}" ${MMK_PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log"
        TEST_RC=${PIPESTATUS[0]}
        [[ "$TEST_RC" == 124 || "$TEST_RC" == 137 ]] && note "pytest hit its ${budget}s time box (rc $TEST_RC)" | tee -a "$OUT/pytest.log"
        note "pytest rc=$TEST_RC"
    fi
fi

# at most 8 files come back: `fold in INTO.json OP.json` moves a whole results document into INTO's
# "folded" {op: doc} (show / compare / --resume read only "cases": INTO is unchanged for them);
# `fold unfold INTO.json OP OUT.json` writes it back out (for --resume, or to commit it)
fold() {
    $PY - "$@" <<'EOF'
import json, sys
from pathlib import Path
mode, into = sys.argv[1], Path(sys.argv[2])
doc = json.loads(into.read_text())
if mode == "in":
    src = Path(sys.argv[3])
    sub = json.loads(src.read_text())
    doc.setdefault("folded", {})[sub["op"]] = sub
    doc.setdefault("notes", []).append(f"folded: the {sub['op']} results ({len(sub.get('cases', []))} rows) are "
                                       "this file's 'folded' entry (scripts/gpu_check.sh: fold unfold)")
    into.write_text(json.dumps(doc, indent=1))
    src.unlink()
else:
    sub = doc.get("folded", {}).get(sys.argv[3])
    if sub is None:
        sys.exit(1)
    Path(sys.argv[4]).write_text(json.dumps(sub, indent=1))
EOF
}

# ---- bench: `mmkernels bench <op>`, resumed until it finishes or the time is up -------------
BENCH_RC=skipped
if has_stage bench; then
    BENCH_RC=0
    : >>"$OUT/bench.log"
    read -r -a ops <<<"${MMK_BENCH_OPS:-attention qformer_cross_attention token_pool attention_varlen}"
    for i in "${!ops[@]}"; do
        op=${ops[$i]}
        json="$OUT/bench_$op.json"
        case "$op" in   # MMK_BENCH_ARGS (set, even empty) overrides: empty = the op's own defaults
            attention) bench_args=${MMK_BENCH_ARGS-"--preset sweep,blip2,llava-ov,gemma3 --mode fwd,fwd+bwd"} ;;
            qformer_cross_attention | qformer) bench_args=${MMK_BENCH_ARGS-"--preset blip2 --mode fwd,fwd+bwd"} ;;
            token_pool) bench_args=${MMK_BENCH_ARGS-"--preset gemma3,llava-ov"} ;;
            vit_encoder) bench_args=${MMK_BENCH_ARGS-"--preset qwen25vl,qwen3vl"} ;;
            # Qwen3-VL tower, one 8836/15376/35344-token image, forward only: packed bf16 / fp8 / scores
            # vs the dense kernels at B=1 (flex: a compile per shape; sdpa-dense: an all-True mask)
            attention_varlen) bench_args=${MMK_BENCH_ARGS-"--preset qwen3vl-tower --mode fwd --exclude flex,sdpa-dense"} ;;
            *) bench_args=${MMK_BENCH_ARGS-} ;;
        esac
        if [[ -n "${MMK_BENCH_PREV:-}" && -f "$MMK_BENCH_PREV/bench_$op.json" ]]; then
            cp "$MMK_BENCH_PREV/bench_$op.json" "$json" && note "continuing $MMK_BENCH_PREV/bench_$op.json"
        elif [[ -n "${MMK_BENCH_PREV:-}" && -f "$MMK_BENCH_PREV/bench_attention.json" ]]; then
            fold unfold "$MMK_BENCH_PREV/bench_attention.json" "$op" "$json" 2>/dev/null \
                && note "continuing $op from $MMK_BENCH_PREV/bench_attention.json (folded)"
        fi
        plot=()
        [[ "${MMK_BENCH_PLOT:-0}" == 1 ]] && plot=(--plot "$OUT/bench_$op.png")
        # the ops still to run share what is left (the summary keeps ~30 s); a later attention_varlen is
        # not counted: it runs on what the others leave (their shares stay what they were without it)
        left=0
        for o in "${ops[@]:i}"; do [[ "$o" == attention_varlen && "$o" != "$op" ]] || left=$((left + 1)); done
        until_s=$(( SECONDS + ($(remaining) - 30) / left ))
        if [[ "$op" == vit_encoder ]] && (( until_s > SECONDS + ${MMK_VIT_ENCODER_S:-240} )); then
            until_s=$(( SECONDS + ${MMK_VIT_ENCODER_S:-240} ))   # bounded: what it leaves goes to the ops after it
        fi
        attempt=0
        while :; do
            box=$(( until_s - SECONDS ))
            if (( box < 75 )); then note "bench $op: only ${box}s left, not starting" | tee -a "$OUT/bench.log"; break; fi
            attempt=$((attempt + 1))
            resume=()
            [[ -f "$json" ]] && resume=(--resume)
            # cases start until --budget-s; the hard box catches a last long one
            note "bench $op attempt $attempt (budget $((box - 60))s, hard box ${box}s)" | tee -a "$OUT/bench.log"
            # shellcheck disable=SC2086
            tbox "$box" $PY -m mmkernels bench "$op" $bench_args \
                --json "$json" "${resume[@]}" --budget-s $((box - 60)) --case-timeout-s "${MMK_CASE_TIMEOUT_S:-300}" \
                --plain --quiet "${plot[@]}" 2>&1 | tee -a "$OUT/bench.log"
            rc=${PIPESTATUS[0]}
            note "bench $op rc=$rc" | tee -a "$OUT/bench.log"
            # 0 done, 2 bad arguments: rerunning cannot help. 3 = fatal CUDA error, 1 = the watchdog
            # ended a hung case, 124/137 = the hard box: --resume skips the culprit and goes on
            [[ "$rc" == 0 || "$rc" == 2 || ! -f "$json" ]] || (( attempt >= 4 )) || continue
            [[ "$rc" == 0 ]] || BENCH_RC=$rc
            break
        done
    done
fi

# ---- suite: the pytest-benchmark suite and the regression gate ----------------------------
SUITE_RC=skipped
if has_stage suite; then
    rem=$(remaining)
    note "suite: scripts/perf_gate.sh (time box $((rem - 30))s; log bench.log)" | tee -a "$OUT/bench.log"
    OUT="$OUT" PYTHON="$PY" tbox $((rem - 30)) bash scripts/perf_gate.sh >>"$OUT/bench.log" 2>&1
    SUITE_RC=$?
    note "suite rc=$SUITE_RC" | tee -a "$OUT/bench.log"
fi

# ---- e2e: the end-to-end example (issue 5) -------------------------------------------------
E2E_RC=skipped
if has_stage e2e; then
    box=${MMK_E2E_S:-$(( $(remaining) - 30 ))}
    if (( box < 60 )); then
        note "e2e: only ${box}s left, not starting" | tee -a "$OUT/bench.log"
    else
        note "e2e: examples/blip2_e2e.py (hard box ${box}s)" | tee -a "$OUT/bench.log"
        # shellcheck disable=SC2086
        tbox "$box" $PY examples/blip2_e2e.py --json "$OUT/e2e.json" ${MMK_E2E_ARGS:-} 2>&1 | tee -a "$OUT/bench.log"
        E2E_RC=${PIPESTATUS[0]}
        note "e2e rc=$E2E_RC" | tee -a "$OUT/bench.log"
    fi
fi

# ---- summary (printed last: the device tool returns the end of the output) ----------------
if has_stage summary; then
    {
        echo "================ gpu_check summary (commit ${MMKERNELS_COMMIT:-unknown}, $((SECONDS - T0))s) ================"
        awk '/^name, driver_version/ { getline; print "gpu: " $0; exit }' "$OUT/env.txt" 2>/dev/null || true
        grep -m1 "^device " "$OUT/env.txt" 2>/dev/null || true
        if [[ "$BUILD_RC" != skipped ]]; then
            echo "cuda extension build rc=$BUILD_RC: $(grep -m1 '^mmkernels._C:' "$OUT/env.txt" 2>/dev/null)"
            [[ "$BUILD_RC" != 0 ]] && grep -iE "error|failed" "$OUT/env.txt" | tail -n 12
        fi
        echo "pytest rc=$TEST_RC: $(grep -E '(passed|failed|error|no tests ran)' "$OUT/pytest.log" 2>/dev/null | tail -n 1)"
        if [[ "$TEST_RC" != 0 && "$TEST_RC" != skipped && -f "$OUT/pytest.log" ]]; then
            fails=$(grep -E "^(FAILED|ERROR) " "$OUT/pytest.log" | head -n 15)
            [[ -n "$fails" ]] && printf -- "--- first failures:\n%s\n" "$fails"
        fi
        echo "bench rc=$BENCH_RC"
        for f in "$OUT"/bench_*.json; do
            [[ -f "$f" ]] && tbox 60 $PY -m mmkernels bench show "$f" --brief 2>&1 | tail -n 120
        done
        if [[ "$SUITE_RC" != skipped ]]; then
            echo "suite rc=$SUITE_RC: $(grep -E '(passed|failed|error)' "$OUT/bench.log" | tail -n 1)"
            grep -E "^(== no baseline|.*case\(s\):.*-> (PASS|FAIL))" "$OUT/bench.log" || true
        fi
        if [[ "$E2E_RC" != skipped ]]; then
            echo "e2e rc=$E2E_RC"
            [[ -f "$OUT/bench.log" ]] && grep -E "^(== |  [a-z]|    (patched|eager|sdpa) |             mmkernels)" "$OUT/bench.log" | tail -n 40
        fi
    } | tee "$OUT/summary.txt"
fi
# the default ops write 4 results files: attention_varlen's goes inside bench_attention.json (8 files back)
if [[ -z "${MMK_BENCH_OPS+x}" && -f "$OUT/bench_attention_varlen.json" && -f "$OUT/bench_attention.json" ]]; then
    fold in "$OUT/bench_attention.json" "$OUT/bench_attention_varlen.json" \
        && note "bench_attention_varlen.json folded into bench_attention.json ('folded')"
fi
ls -la "$OUT"
# exit status for the caller: 0 only when the tests passed (or were not asked for) and the
# benchmark and suite stages finished; the files under $OUT come back either way
for rc in "$TEST_RC" "$BUILD_RC" "$BENCH_RC" "$SUITE_RC" "$E2E_RC"; do
    [[ "$rc" == 0 || "$rc" == skipped ]] || exit 1
done
