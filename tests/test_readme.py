"""README.md runs as written: every python block, top to bottom in one scope (as a reader copies
them), with the shell commands that make the teacher cache the last block reads ("/tmp/" put in a
temporary directory)."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)


def _commands(shell_block):
    """The `$ ` lines of a shell block, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", shell_block)
    return [line[2:] for line in text.splitlines() if line.startswith("$ ")]


@pytest.mark.slow
def test_readme_blocks_run_top_to_bottom(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    scope = {}
    python = [(lang, body) for lang, body in BLOCKS if lang == "python"]
    assert len(python) >= 5
    env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for lang, body in BLOCKS:
        body = body.replace("/tmp/", f"{tmp_path}/")
        if lang == "" and "fastkd cache" in body:  # the commands the cache block reads back
            for cmd in _commands(body):
                cmd = cmd.replace(".venv/bin/python", sys.executable).replace("tests/", f"{ROOT}/tests/")
                r = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
                assert r.returncode == 0, cmd + "\n" + r.stderr[-2000:]
        if lang == "python":
            exec(compile(body, "README.md", "exec"), scope)
    assert float(scope["loss"]) >= 0


def test_fastkd_hf_is_reachable_lazily():
    """`import torch, fastkd` then fastkd.hf.causal_lm_kd_loss (README's order) raised AttributeError;
    and import fastkd alone must not import transformers."""
    code = ("import sys, fastkd; assert 'transformers' not in sys.modules; "
            "f = fastkd.hf.causal_lm_kd_loss; assert 'transformers' in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
