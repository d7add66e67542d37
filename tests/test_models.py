"""Every backbone × interconnect × GNN × decoder builds and runs forward + backward on a tiny batch."""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONFIGS, compose

BACKBONES = sorted(p.stem for p in (CONFIGS / "backbone").glob("*.yaml"))
INTERCONNECTS = sorted(p.stem for p in (CONFIGS / "interconnect").glob("*.yaml"))
GNNS = sorted(p.stem for p in (CONFIGS / "gnn").glob("*.yaml"))
DECODERS = sorted(p.stem for p in (CONFIGS / "decoder").glob("*.yaml"))
# small widths and an 8×8 image (a 2×2 map after simple_cnn) keep each of the few hundred combinations to milliseconds
SMALL = {
    "simple_cnn": ["backbone.width=4", "backbone.depth=2"],
    "resnet18": ["backbone.stage=1"],
    "pixels": [],
    "airbench": ["backbone.width=4", "backbone.depth=1", "backbone.whiten_kernel=1"],  # a 4×4 map
}
IMAGE = (1, 8, 8)


def _settings(backbone, interconnect, gnn, decoder) -> list[str]:
    over = []
    if gnn not in ("none", "propagate"):
        over.append("gnn.hidden_channels=8")
    if decoder == "scatter":
        over.append("decoder.channels=8")
    if interconnect == "keypoints":
        over.append("interconnect.num_keypoints=4")
    if interconnect == "knn":
        over.append("interconnect.k=3")
    return over


@functools.lru_cache(maxsize=None)
def _node(group: str, option: str):
    """A group option's file, merged over the options of its own group it inherits from."""
    node = OmegaConf.load(CONFIGS / group / f"{option}.yaml")
    bases = [d for d in node.pop("defaults", []) if d != "_self_"]
    return OmegaConf.merge(*(_node(group, base) for base in bases), node)


@functools.lru_cache(maxsize=None)
def _backbone(name: str):
    from interconnects.models.hybrid import build_part

    cfg = OmegaConf.merge({"backbone": _node("backbone", name)}, OmegaConf.from_dotlist(SMALL[name]))
    return build_part("backbone", cfg.backbone, in_channels=IMAGE[0])


COMBOS = list(itertools.product(BACKBONES, INTERCONNECTS, GNNS, DECODERS))


@pytest.mark.parametrize("backbone,interconnect,gnn,decoder", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_combination_forward_backward(backbone, interconnect, gnn, decoder):
    """The group files are merged directly (composition itself is tested in test_runner) and each
    backbone is built once, so the few hundred combinations take seconds."""
    from interconnects.models.hybrid import ConfigError, build_model

    parts = {"backbone": backbone, "interconnect": interconnect, "gnn": gnn, "decoder": decoder, "task": "classify"}
    over = _settings(backbone, interconnect, gnn, decoder)
    cfg = OmegaConf.merge({g: _node(g, o) for g, o in parts.items()}, OmegaConf.from_dotlist(over))
    torch.manual_seed(0)
    if interconnect == "none" and gnn != "none":  # no graph for the GNN: refused, never silently dropped
        with pytest.raises(ConfigError, match=r"gnn.layer=.* needs a graph, but interconnect=none"):
            build_model(cfg, IMAGE[0], IMAGE[1:], num_classes=3, backbone=copy.deepcopy(_backbone(backbone)))
        return
    model = build_model(cfg, IMAGE[0], IMAGE[1:], num_classes=3, backbone=copy.deepcopy(_backbone(backbone)))
    images = torch.randn(2, *IMAGE, requires_grad=True)
    logits = model(images)
    assert logits.shape == (2, 3)
    logits.logsumexp(1).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert model.head.fc.weight.grad is not None


def test_channel_counts_are_inferred_stage_by_stage():
    from interconnects.models.hybrid import build_model, parameter_table

    cfg = compose(["backbone=resnet18", "backbone.stage=2", "interconnect=knn", "gnn=sage", "gnn.hidden_channels=24"])
    model = build_model(cfg, 3, (16, 16), num_classes=5)
    assert model.backbone.out_channels == 128
    assert model.gnn.out_channels == 24
    names = [name for name, _ in parameter_table(model)]
    assert names == ["backbone", "interconnect", "gnn", "decoder", "head", "total"]


def test_impossible_interconnect_settings_fail_when_the_model_is_built():
    from interconnects.models.hybrid import ConfigError, build_model

    with pytest.raises(ConfigError, match="num_keypoints=50"):
        build_model(compose(["interconnect=keypoints", "interconnect.num_keypoints=50"]), 1, (28, 28), 10)
    with pytest.raises(ConfigError, match="k=49"):
        build_model(compose(["interconnect=knn", "interconnect.k=49"]), 1, (28, 28), 10)
    with pytest.raises(ConfigError, match="edges='bogus'"):
        build_model(compose(["interconnect.edges=bogus"]), 1, (28, 28), 10)


def test_cnn_baseline_has_no_graph_and_same_backbone():
    from interconnects.models.hybrid import build_model

    hybrid = build_model(compose(["experiment=quickstart"]), 1, (28, 28), 10)
    baseline = build_model(compose(["experiment=cnn_baseline"]), 1, (28, 28), 10)
    assert baseline.interconnect is None and baseline.gnn is None
    assert [p.shape for p in baseline.backbone.parameters()] == [p.shape for p in hybrid.backbone.parameters()]


def test_knyazev_pixels_is_linear_on_propagated_pixels():
    """The reproduction's model is exactly Linear(784 → 10, no bias) applied to A·x."""
    from interconnects.models.hybrid import build_model

    model = build_model(compose(["experiment=knyazev_pixels"]), 1, (28, 28), 10).eval()
    params = dict(model.named_parameters())
    assert list(params) == ["head.fc.weight"] and params["head.fc.weight"].shape == (10, 784)
    adj = model.interconnect(torch.zeros(1, 1, 28, 28)).adj[0]
    x = torch.randn(3, 1, 28, 28)
    expected = (adj @ x.view(3, 784, 1)).squeeze(-1) @ params["head.fc.weight"].T
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_knyazev_reference_script_builds_the_experiments_adjacency(monkeypatch):
    """The experiment's ``A`` is the published one (exp(-d/σ²) over coordinates / 28, σ = 0.05π, < 0.01 → 0,
    D^-1/2 A D^-1/2, then A[A > 1e-4] -= 0.2), as scripts/knyazev_reference.py builds it and trains on."""
    import sys

    from interconnects.models.hybrid import build_model

    monkeypatch.syspath_prepend(str(CONFIGS.parent / "scripts"))
    sys.modules.pop("knyazev_reference", None)
    import knyazev_reference

    model = build_model(compose(["experiment=knyazev_pixels"]), 1, (28, 28), 10)
    adj = model.interconnect(torch.zeros(1, 1, 28, 28)).adj[0]
    torch.testing.assert_close(knyazev_reference.published_adjacency(-0.2), adj, rtol=1e-4, atol=1e-6)
    unshifted = build_model(compose(["experiment=knyazev_pixels", "interconnect.edge_shift=0"]), 1, (28, 28), 10)
    torch.testing.assert_close(knyazev_reference.published_adjacency(0.0),
                               unshifted.interconnect(torch.zeros(1, 1, 28, 28)).adj[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("interconnect", ["grid", "keypoints", "knn"])
def test_the_mnist_hybrids_compile_without_graph_breaks(interconnect):
    """``trainer.compile=true`` compiles what a step runs through the model as one graph."""
    from interconnects.models.hybrid import build_model

    model = build_model(compose([f"interconnect={interconnect}", "backbone.width=8", "gnn.hidden_channels=8",
                                 "decoder.channels=8"]), 1, (28, 28), num_classes=10)
    images, labels = torch.randn(4, 1, 28, 28), torch.arange(4)
    explained = torch._dynamo.explain(lambda x: torch.nn.functional.cross_entropy(model(x), labels))(images)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1
