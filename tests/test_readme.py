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


def _section(title: str) -> str:
    return re.search(rf"^## {title}\n(.*?)(?=^## )", README, flags=re.S | re.M).group(1)


def test_python_api_blocks_run_as_written(capsys):
    blocks = re.findall(r"```python\n(.*?)```", _section("Python API"), flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "tensor([[6., 6.]])" in out


def test_extending_examples_run_as_written(capsys):
    """The layer, interconnect and backbone of "Extending", run in order as a reader would."""
    blocks = re.findall(r"```python\n(.*?)```", _section("Extending"), flags=re.S)
    assert len(blocks) == 3
    namespace = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert "torch.Size([2, 32, 7, 7])" in capsys.readouterr().out
    assert len(blocks[0].strip().splitlines()) <= 25  # the layer stays a short read
    # the layer's dense and sparse paths agree on the same graph
    import torch

    from interconnects import KNNGraph

    graph = KNNGraph(k=3)(torch.randn(2, 4, 3, 3))
    layer = namespace["MeanNeighbours"](4, 5)
    dense = torch.zeros(2, 9, 9).index_put_(
        (graph.edge_index[1] // 9, graph.edge_index[1] % 9, graph.edge_index[0] % 9), torch.ones(graph.edge_index.shape[1]))
    torch.testing.assert_close(layer(graph.x, dense), layer(graph.x, None, graph.edge_index))
