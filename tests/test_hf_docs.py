"""docs/hf.md runs as written: its python blocks, top to bottom in one scope (a LoRA student with
evaluation, a teacher behind a callable)."""
import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "hf.md"


@pytest.mark.slow
def test_hf_doc_blocks_run(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)  # the Trainers' output_dir
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 3
    scope = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC}:block{i}", "exec"), scope)
    before, after = scope["before"], scope["after"]
    assert after["eval_loss"] < before["eval_loss"] and float(scope["loss"]) > 0
    for m in (before, after):  # the loss is its parts: 0.9 KD + 0.1 CE (hard_weight 0.1)
        assert m["eval_loss"] == pytest.approx(0.9 * m["eval_kd_loss"] + 0.1 * m["eval_ce_loss"], rel=1e-4)
        assert 0 <= m["eval_top1_agreement"] <= 1 and m["eval_student_entropy"] > 0
