"""The README's Python snippets run as written (on this machine's device), in order, in one
namespace — the way a reader pastes them into a session."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a subprocess / an emulation build: `-m "not slow"` skips it

ROOT = Path(__file__).resolve().parents[1]


def snippets() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_snippets():
    assert len(snippets()) >= 6


def test_readme_snippets_run():
    """All ```python blocks, concatenated, in a fresh interpreter without TRITON_INTERPRET: what a
    user on this machine gets (on a CPU the ops take their CPU backends)."""
    code = "\n\n".join(f"# --- snippet {i}\n{s}" for i, s in enumerate(snippets()))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MMKERNELS_BACKEND")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=ROOT)
    assert res.returncode == 0, f"README snippets failed:\n{res.stderr[-3000:]}"
