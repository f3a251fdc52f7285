"""docs/migrating.md: every python block runs as written (after the shared setup block) and its
assertions -- each peer's formula equals the fastkd call beside it -- hold."""
import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "migrating.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.parametrize("i", range(1, len(BLOCKS)))
def test_block_runs(i):
    scope = {}
    exec(compile(BLOCKS[0], f"{DOC}:setup", "exec"), scope)
    exec(compile(BLOCKS[i], f"{DOC}:block{i}", "exec"), scope)


def test_every_peer_has_a_block():
    text = DOC.read_text()
    for peer in ("TRL", "Liger-Kernel", "torchtune", "DistillKit", "DistiLLM", "ModelOpt"):
        assert f"## {peer}" in text or peer in text
    assert len(BLOCKS) >= 7
