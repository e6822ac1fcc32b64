"""scripts/hf_mmkernels_plugin.py (used by scripts/hf_model_tests.sh) really patches the models a
foreign test file builds: a tiny transformers-style test run under the plugin sees its model
patched whole (the outermost model), and the summary line counts it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]

FOREIGN_TEST = '''
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

def test_model_runs_patched():
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64),
        image_token_index=63, vision_feature_layer=-1, image_seq_length=16)
    model = LlavaForConditionalGeneration(cfg).eval()
    ids = torch.randint(0, 60, (1, 20))
    ids[:, 1:17] = 63
    with torch.no_grad():
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16))
    assert getattr(model, "_mmkernels_patch_state", None) is not None
    assert model.config.text_config._attn_implementation == "mmkernels"
    assert model.config.vision_config._attn_implementation == "mmkernels"
'''


@pytest.mark.slow
def test_plugin_patches_models_built_by_foreign_tests(tmp_path):
    (tmp_path / "test_foreign.py").write_text(FOREIGN_TEST)
    env = dict(os.environ)
    env["MMK_HF_BACKEND"] = "sdpa"  # this test is about the patching; the kernels are tested elsewhere
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "scripts"), str(ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "hf_mmkernels_plugin",
                          str(tmp_path / "test_foreign.py")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "[mmkernels] models patched: 1, patch() errors: 0" in res.stdout
