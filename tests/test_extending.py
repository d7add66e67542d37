"""Parts from outside the package: a user's backbone (by a config file on Hydra's search path) and
GNN layer (by dotted path) train through train.py; evaluate.py builds them only when trusted; a part
that misses its contract stops the build with one line."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, run_cli

SHORT = [*TINY, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1", "logger=none"]

NETS = '''
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, in_channels, width=16):
        super().__init__()
        self.out_channels = width
        self.net = nn.Sequential(nn.Conv2d(in_channels, width, 3, 2, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 2, 1))

    def forward(self, image):
        return self.net(image)


class NoChannels(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, 4, 1)

    def forward(self, image):
        return self.conv(image)
'''

LAYERS = '''
from torch import nn


class Linear(nn.Module):
    supports_dense, supports_sparse = True, True

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.lin = nn.Linear(in_channels, out_channels)

    def forward(self, x, adj=None, edge_index=None, edge_weight=None):
        return self.lin(adj @ x if adj is not None else x)
'''


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    (root / "mylab").mkdir()
    (root / "mylab" / "__init__.py").write_text("")
    (root / "mylab" / "nets.py").write_text(NETS)
    (root / "mylab" / "layers.py").write_text(LAYERS)
    (root / "myconf" / "backbone").mkdir(parents=True)
    (root / "myconf" / "backbone" / "tiny.yaml").write_text("_target_: mylab.nets.TinyCNN\nwidth: 12\n")
    return root


def _train(lab, run, *extra):
    return run_cli("train.py", *SHORT, f"hydra.searchpath=[file://{lab / 'myconf'}]", *extra,
                   f"hydra.run.dir={run}", env={"PYTHONPATH": str(lab)})


def test_users_backbone_and_layer_train_and_evaluate_only_when_trusted(lab, tmp_path):
    run = tmp_path / "run"
    proc = _train(lab, run, "backbone=tiny", "gnn.layer=mylab.layers.Linear")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test/acc" in json.loads((run / "metrics.json").read_text())
    refused = run_cli("evaluate.py", f"ckpt_path={run}", f"hydra.run.dir={tmp_path / 'e1'}", env={"PYTHONPATH": str(lab)})
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("error: refusing to build") and "mylab" in line and "trust=[mylab]" in line
    assert not (tmp_path / "e1" / "metrics.json").exists()
    trusted = run_cli("evaluate.py", f"ckpt_path={run}", "trust=[mylab]", f"hydra.run.dir={tmp_path / 'e2'}",
                      env={"PYTHONPATH": str(lab)})
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert "test/acc" in json.loads((tmp_path / "e2" / "metrics.json").read_text())


def test_resuming_a_users_model_needs_trust_too(lab, tmp_path):
    run = tmp_path / "run"
    assert _train(lab, run, "backbone=tiny", "trainer.max_epochs=2", "trainer.limit_train_batches=1",
                  "scheduler=constant").returncode == 0
    last = run / "checkpoints" / "last.ckpt"
    refused = _train(lab, tmp_path / "other", "backbone=tiny", "trainer.max_epochs=3", "trainer.limit_train_batches=1",
                     "scheduler=constant", f"ckpt_path={last}")
    assert refused.returncode == 2 and "trust=[mylab]" in refused.stderr


def test_overriding_only_the_target_says_which_keys_to_drop(lab, tmp_path):
    proc = _train(lab, tmp_path / "run", "backbone._target_=mylab.nets.TinyCNN")
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "backbone.depth is not a setting of TinyCNN" in line and "~backbone.depth" in line and "config file" in line
    assert not (tmp_path / "run").exists()


def test_a_backbone_without_out_channels_is_refused_naming_it(lab, tmp_path):
    proc = _train(lab, tmp_path / "run", "~backbone.depth", "~backbone.width", "~backbone.batch_norm",
                  "~backbone.output_stride", "backbone._target_=mylab.nets.NoChannels")
    assert proc.returncode == 2
    assert "mylab.nets.NoChannels lacks an integer attribute out_channels" in proc.stderr.strip().splitlines()[-1]


def test_a_layer_that_is_not_a_layer_is_refused(lab, tmp_path):
    proc = _train(lab, tmp_path / "run", "gnn.layer=mylab.nets.TinyCNN")
    assert proc.returncode == 2 and "gnn.layer=" in proc.stderr.strip().splitlines()[-1]
