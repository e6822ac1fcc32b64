#!/usr/bin/env bash
# The performance gate: run the pytest-benchmark suite (benchmarks/test_bench_*.py) and compare
# it with this device's baseline, benchmarks/baselines/<device-slug>.json. Fails (exit 1) when
# any case's median grew by more than the threshold; prints a table of every case's change.
#
#   bash scripts/perf_gate.sh                       # run + compare, threshold 10 %
#   MMK_PERF_THRESHOLD=0.05 bash scripts/perf_gate.sh
#   MMK_PERF_UPDATE=1 bash scripts/perf_gate.sh     # run, then make the result the device's baseline
#   MMK_PERF_REQUIRE_BASELINE=1 ...                 # a device without a baseline fails instead of passing
#   MMK_PERF_PYTEST_ARGS="-k attention" ...         # extra pytest arguments (a subset)
#
# Writes under $OUT (default ./perf_out): perf_<device-slug>.json (the suite's cases as one
# `mmkernels bench --json` document: device, versions, commit; each case's do_bench median on
# CUDA, the number the gate compares) and compare.txt.
# The device slug is the suite JSON's device.slug (mmkernels.bench.env.device_slug(), e.g.
# nvidia-h100-80gb-hbm3). CPU timings on a shared box are too noisy to gate on: on a
# machine without a GPU the suite runs as a smoke test and the gate only reports.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
OUT="${OUT:-$REPO/perf_out}"
THRESHOLD="${MMK_PERF_THRESHOLD:-0.10}"
mkdir -p "$OUT"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")

echo "== suite: $PY -m pytest benchmarks --mmk-json $OUT/perf.json"
# shellcheck disable=SC2086
"$PY" -m pytest benchmarks -q -p no:cacheprovider --mmk-json "$OUT/perf.json" \
    --benchmark-columns=median,iqr,rounds --benchmark-sort=fullname ${MMK_PERF_PYTEST_ARGS:-}
# the device's key as the suite measured it (on a CPU it holds the suite's thread count)
slug=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['device']['slug'])" "$OUT/perf.json")
json="$OUT/perf_$slug.json"
mv "$OUT/perf.json" "$json"
baseline="benchmarks/baselines/$slug.json"

if [[ "${MMK_PERF_UPDATE:-0}" == "1" ]]; then
    cp "$json" "$baseline"
    echo "== wrote the new baseline $baseline (commit it, with the device and the reason in the message)"
    exit 0
fi
if [[ ! -f "$baseline" ]]; then
    echo "== no baseline for this device ($baseline)."
    echo "   To start one: MMK_PERF_UPDATE=1 bash scripts/perf_gate.sh, then commit $baseline."
    [[ "${MMK_PERF_REQUIRE_BASELINE:-0}" == "1" ]] && exit 1
    exit 0
fi
echo "== gate: mmkernels bench compare $baseline $json --threshold $THRESHOLD"
rc=0
"$PY" -m mmkernels bench compare "$baseline" "$json" --threshold "$THRESHOLD" | tee "$OUT/compare.txt" \
    || rc=${PIPESTATUS[0]}
if [[ "$cuda" != "1" && "$rc" == "1" ]]; then
    echo "== CPU timings: the regression above is reported, not enforced (no GPU: a smoke test)"
    rc=0
fi
exit "$rc"
