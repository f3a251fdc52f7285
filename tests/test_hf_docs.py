"""docs/hf.md runs as written: its python blocks, top to bottom in one scope (a LoRA student with
evaluation, a teacher behind a callable)."""
import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "hf.md"


def test_hf_doc_blocks_run(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)  # the Trainers' output_dir
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 3
    scope = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC}:block{i}", "exec"), scope)
    assert scope["after"] < scope["before"] and float(scope["loss"]) > 0
