"""The README's promises: its first code block is the two set-up commands, and its Python runs as written."""

from __future__ import annotations

import re

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_first_code_block_is_the_two_setup_commands():
    first = re.search(r"```\w*\n(.*?)```", README, flags=re.S).group(1)
    assert first.strip().splitlines() == ["make quickstart", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_python_api_blocks_run_as_written(capsys):
    blocks = _blocks("python")
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "tensor([[6., 6.]])" in out
