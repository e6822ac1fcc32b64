"""Smoke test of ``examples/blip2_e2e.py`` (the end-to-end example and benchmark): ``--tiny`` runs in
seconds on a CPU (no Triton interpreter: mmkernels falls back to its sdpa / reference backends and
says so), times the three variants and writes the JSON record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a subprocess / an emulation build: `-m "not slow"` skips it

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def test_blip2_e2e_tiny(tmp_path):
    out = tmp_path / "e2e.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "blip2_e2e.py"), "--tiny", "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fall back to their sdpa / reference backends" in proc.stdout, proc.stdout
    rec = json.loads(out.read_text())
    for key in ("device", "versions", "commit", "date", "note"):
        assert key in rec, key
    assert rec["tiny"] is True and set(rec["models"]) == {"blip2", "llava-ov"}
    blip2 = rec["models"]["blip2"]["modes"]
    assert set(blip2) == {"fwd", "qformer-fwd+bwd"} and set(rec["models"]["llava-ov"]["modes"]) == {"fwd"}
    for model in rec["models"].values():
        for row in model["modes"].values():
            assert set(row) == {"patched", "eager", "sdpa"}
            assert row["patched"]["ms_p50"] > 0 and "speedup_vs_eager" in row["patched"]
            assert "speedup_vs_sdpa" in row["patched"]
        for diff in model["max_abs_diff_vs_eager"].values():
            assert diff < 5e-2  # bf16 vision tower: variants agree to bf16 rounding
    # the patched model really went through mmkernels (here on its CPU fallbacks)
    ran = blip2["fwd"]["patched"]["mmkernels_backends"]
    assert ran.get("attention:sdpa") and ran.get("qformer_cross_attention:sdpa"), ran
    assert "token_pool:reference" in rec["models"]["llava-ov"]["modes"]["fwd"]["patched"]["mmkernels_backends"]
