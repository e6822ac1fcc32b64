#!/usr/bin/env bash
# transformers' own model test files, run twice — plain, and with mmkernels plugged into every
# model the tests build (scripts/hf_mmkernels_plugin.py) — and the difference printed.  For
# releases (tens of minutes on a CPU), not CI.  Fetches nothing at run time.
#
#   git clone --depth 1 --branch "v$(python -c 'import transformers; print(transformers.__version__)')" \
#       https://github.com/huggingface/transformers /tmp/transformers      # the installed version's tests
#   pip install -e ".[dev,hf]" parameterized                              # what transformers' tests import
#   bash scripts/hf_model_tests.sh /tmp/transformers                      # the default model list
#   bash scripts/hf_model_tests.sh /tmp/transformers siglip llava         # some models
#   MMK_HF_BACKEND=triton bash scripts/hf_model_tests.sh /tmp/transformers blip_2   # Triton forced
#
# Output: a per-file table (passed / failed / skipped, plain vs mmkernels), the tests that pass
# plain and fail with mmkernels (minus those that fail by design: they assert the implementation's
# name), written to docs/hf_model_tests.md with the transformers version and date.  JUnit XML
# of each run stays in $OUT_DIR (default /tmp/mmk-hf-tests).
set -euo pipefail

TF="${1:?usage: bash scripts/hf_model_tests.sh TRANSFORMERS_CHECKOUT [MODEL ...]}"
shift
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT_DIR="${OUT_DIR:-/tmp/mmk-hf-tests}"
mkdir -p "$OUT_DIR"
models=("$@")
if (( ${#models[@]} == 0 )); then
    models=(clip siglip blip_2 instructblip llava llava_next llava_onevision qwen2_vl qwen2_5_vl gemma3 idefics3 internvl)
fi

for m in "${models[@]}"; do
    f="$TF/tests/models/$m/test_modeling_$m.py"
    if [[ ! -f "$f" ]]; then
        echo "== $m: $f not found, skipped"
        continue
    fi
    echo "== $m: plain"
    (cd "$TF" && "$PY" -m pytest "$f" -q -p no:cacheprovider --junitxml="$OUT_DIR/$m.plain.xml" >"$OUT_DIR/$m.plain.log" 2>&1) || true
    tail -n 1 "$OUT_DIR/$m.plain.log"
    echo "== $m: with mmkernels"
    (cd "$TF" && PYTHONPATH="$REPO/scripts:$REPO${PYTHONPATH:+:$PYTHONPATH}" \
        "$PY" -m pytest "$f" -q -p no:cacheprovider -p hf_mmkernels_plugin --junitxml="$OUT_DIR/$m.mk.xml" \
        >"$OUT_DIR/$m.mk.log" 2>&1) || true
    tail -n 2 "$OUT_DIR/$m.mk.log"
done

"$PY" - "$OUT_DIR" "$REPO/docs/hf_model_tests.md" "${models[@]}" <<'PYEOF'
import datetime
import os
import sys
import xml.etree.ElementTree as ET

import transformers

out_dir, doc, models = sys.argv[1], sys.argv[2], sys.argv[3:]
# tests that assert the attention implementation's name: they fail by design with "mmkernels"
BY_DESIGN = ("test_can_set_attention_dynamically", "test_sdpa_can_dispatch_", "test_sdpa_can_compile_dynamic",
             "test_flash_attn_", "test_can_use_safetensors")


def results(path):
    res = {}
    if not os.path.exists(path):
        return res
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        kinds = {c.tag for c in case}
        res[name] = "failed" if kinds & {"failure", "error"} else ("skipped" if "skipped" in kinds else "passed")
    return res


lines = [f"# transformers model tests with mmkernels plugged in",
         "",
         f"transformers {transformers.__version__}, {datetime.date.today()}, "
         f"`bash scripts/hf_model_tests.sh` (plain vs `-p hf_mmkernels_plugin`).",
         "",
         "| file | plain pass/fail/skip | mmkernels pass/fail/skip | new failures | by design |",
         "|---|---|---|---|---|"]
details = []
for m in models:
    plain, mk = results(f"{out_dir}/{m}.plain.xml"), results(f"{out_dir}/{m}.mk.xml")
    if not plain and not mk:
        continue
    count = lambda r: "/".join(str(sum(v == k for v in r.values())) for k in ("passed", "failed", "skipped"))
    new = sorted(n for n, v in mk.items() if v == "failed" and plain.get(n) == "passed")
    design = [n for n in new if any(b in n for b in BY_DESIGN)]
    real = [n for n in new if n not in design]
    lines.append(f"| test_modeling_{m}.py | {count(plain)} | {count(mk)} | {len(real)} | {len(design)} |")
    if real:
        details += [f"", f"## {m}: new failures", ""] + [f"- `{n}`" for n in real]
text = "\n".join(lines + details) + "\n"
print(text)
os.makedirs(os.path.dirname(doc), exist_ok=True)
with open(doc, "w") as fh:
    fh.write(text)
PYEOF
