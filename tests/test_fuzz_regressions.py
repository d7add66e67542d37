"""What the random-configuration search (scripts/fuzz_configs.py) found, each pinned at its cause."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _lrs(total_steps: int, ours: bool, optimizer=torch.optim.AdamW, **schedule) -> list[float]:
    """The learning rate before each of ``total_steps`` steps of a one-cycle schedule, and after the last."""
    from interconnects.engine.loop import make_scheduler

    weight = torch.nn.Parameter(torch.zeros(1))
    opt = optimizer([weight], lr=1e-3)
    factory = functools.partial(torch.optim.lr_scheduler.OneCycleLR, **schedule)
    sched = (make_scheduler(factory, opt, total_steps) if ours
             else factory(opt, max_lr=1e-3, total_steps=total_steps))
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(total_steps):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("three_phase", [False, True])
@pytest.mark.parametrize("pct_start", [0.2, 0.25, 0.1, 0.5, 1.0, 0.0, 0.3])
def test_a_onecycle_schedule_takes_any_step_count(pct_start, three_phase):
    """torch's OneCycleLR divides by zero when a phase spans no step (5 steps at pct_start=0.2,
    the default: ``trainer.limit_train_batches=5 trainer.max_epochs=1``); the engine's schedule
    takes every count, and is torch's own wherever torch's works."""
    crashed = 0
    for steps in range(1, 41):
        lrs = _lrs(steps, True, pct_start=pct_start, three_phase=three_phase)
        used = lrs[:-1]  # (the rate after the last step is never used)
        assert all(0 < lr <= 1e-3 for lr in used), (steps, lrs)
        try:
            reference = _lrs(steps, False, pct_start=pct_start, three_phase=three_phase)
        except ZeroDivisionError:
            crashed += 1
            continue
        assert lrs == reference, steps
    if (pct_start, three_phase) in ((0.2, False), (1.0, False)):
        assert crashed > 0  # the cases this fixes are among those tried


def test_a_five_step_onecycle_warms_up_at_its_first_step_and_anneals_to_the_end():
    lrs = _lrs(5, True, pct_start=0.2)
    assert lrs[0] == pytest.approx(1e-3)  # a one-step warm-up is complete at once
    assert lrs[:5] == sorted(lrs[:5], reverse=True) and lrs[4] < 1e-6
    momentum = _lrs(5, True, optimizer=torch.optim.SGD, pct_start=0.2)  # cycle_momentum with SGD's momentum
    assert momentum == lrs


def test_a_one_step_run_with_a_full_warm_up_trains_at_the_peak():
    assert _lrs(1, True, pct_start=1.0)[0] == pytest.approx(1e-3)


def test_five_batches_of_the_mnist_sample_train_in_a_joblib_sweep(tmp_path, mnist_sample):
    """The command of the report: ``-m hydra/launcher=joblib data=mnist data.root=... trainer.max_epochs=1
    trainer.limit_train_batches=5 seed=0,1`` (each job a 5-step one-cycle schedule) finishes."""
    sweep = tmp_path / "sweep"
    proc = run_cli("train.py", "-m", "hydra/launcher=joblib", "data=mnist", f"data.root={mnist_sample}",
                   "trainer.max_epochs=1", "trainer.limit_train_batches=5", "seed=0,1", "trainer.progress=false",
                   "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ZeroDivisionError" not in proc.stderr + proc.stdout
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["steps"] == 5 and 0 <= metrics["test/acc"] <= 1


def test_a_resume_from_a_missing_checkpoint_outside_a_run_leaves_no_run_directory(tmp_path):
    """A ``ckpt_path=`` that is not inside a run directory starts a new one; refused, it is removed."""
    proc = run_cli("train.py", "data=digits", "logger=none", f"ckpt_path={tmp_path / 'gone' / 'checkpoints' / 'last.ckpt'}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: ckpt_path='{tmp_path / 'gone' / 'checkpoints' / 'last.ckpt'}' does not exist (or is not a file)"]
    assert not (tmp_path / "run").exists()


def _cost_warnings(caplog, *overrides: str) -> list[str]:
    from conftest import compose
    from interconnects.data import data_info
    from interconnects.engine.build import build_task
    from interconnects.engine.costs import warn_costs

    cfg = compose(["data=digits", *overrides])
    info = data_info(cfg.data)
    task = build_task(cfg, info)
    caplog.clear()
    with caplog.at_level("WARNING", logger="interconnects"):
        warn_costs(task, info.in_channels, tuple(info.image_size), cfg.data.batch_size,
                   cfg.data.get("eval_batch_size") or max(cfg.data.batch_size, 256))
    return [r.getMessage() for r in caplog.records if "expect slow" in r.getMessage()]


def test_the_default_hybrid_is_not_warned_about(caplog):
    assert _cost_warnings(caplog) == []
    assert _cost_warnings(caplog, "interconnect=knn", "data.batch_size=128") == []


def test_a_wide_backbone_at_a_large_batch_is_warned_naming_the_keys(caplog):
    """Not a graph at all: resnet18's convolutions at batch 64 (62 GMAC a step by the count)."""
    [line] = _cost_warnings(caplog, "backbone=resnet18", "data.batch_size=64")
    assert "data.batch_size=64" in line and "backbone" in line and "GMAC a training step" in line
    assert _cost_warnings(caplog, "backbone=resnet18", "data.batch_size=2", "data.eval_batch_size=2") == []


def test_a_large_evaluation_batch_is_warned_though_training_steps_are_small(caplog):
    """Found by the search: resnet18 at batch 1 trains in 0.1 GMAC a step, but evaluates 256 images at once."""
    [line] = _cost_warnings(caplog, "backbone=resnet18", "data.batch_size=1")
    assert "expect slow evaluation" in line and "data.eval_batch_size=256" in line


def test_a_gcn_on_a_large_complete_graph_is_warned_though_it_builds_no_tensor_per_edge(caplog):
    """784 pixel nodes, a complete graph of 614,656 edges, 64 channels, batch 64: the aggregation dominates."""
    [line] = _cost_warnings(caplog, "backbone=pixels", "gnn=gcn", "data.batch_size=64")
    assert "784 nodes" in line and "614,656 edges" in line and "gnn.hidden_channels=64" in line
    assert "gnn.num_layers=2" in line and "data.batch_size=64" in line and "tensor per edge" not in line
    assert _cost_warnings(caplog, "backbone=pixels", "gnn=gcn", "data.batch_size=2", "data.eval_batch_size=2",
                          "gnn.hidden_channels=8") == []


def test_a_gatedgcn_on_superpixels_is_warned_naming_the_graph_keys_not_the_backbone(caplog):
    """cifar10_superpixels' setting: its node-wise linears hold more multiply-adds than its 968 edges, but
    the per-edge gates take the time, and ``backbone=pixels`` has no width or stage to make smaller."""
    [line] = _cost_warnings(caplog, "experiment=cifar10_superpixels", "data=digits", "data.image_size=32")
    assert "121 nodes (interconnect.num_segments)" in line and "968 edges: interconnect.k" in line, line
    assert "gnn.layer=gatedgcn (a tensor per edge)" in line and "backbone (" not in line, line


def test_the_estimate_leaves_the_rng_and_the_train_mode_as_they_were():
    from conftest import compose
    from interconnects.data import data_info
    from interconnects.engine.build import build_task
    from interconnects.engine.costs import step_cost

    cfg = compose(["data=digits", "interconnect=keypoints", "interconnect.select=random"])
    info = data_info(cfg.data)
    model = build_task(cfg, info).networks()["model"]
    state = torch.random.get_rng_state()
    cost = step_cost(model, info.in_channels, tuple(info.image_size))
    assert torch.equal(torch.random.get_rng_state(), state) and model.training
    assert cost.nodes == 16 and cost.cnn > 0 and cost.graph > 0


# ---- a training batch of one image where a BatchNorm layer sees a single value per channel ----------------

def test_a_batch_of_one_image_on_a_one_by_one_map_is_refused_before_any_work(tmp_path):
    """airbench on 7×7 images ends in a 1×1 map; at ``data.batch_size=1`` its BatchNorm sees one value
    per channel, which failed at the first training step and left checkpoints/ and tensorboard/ behind."""
    proc = run_cli("train.py", "data=digits", "backbone=airbench", "backbone.width=4", "data.image_size=7",
                   "data.batch_size=1", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                   "trainer.progress=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: data.batch_size=1 leaves a training batch of one image, in which BatchNorm layer "
                           "model.backbone.blocks.1.norm1 (input [1, 16, 1, 1]) sees one value per channel")
    assert "data.batch_size=2" in line and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_an_epoch_ending_in_one_image_is_refused_through_the_cli_and_leaves_no_directory(tmp_path):
    """The last-batch check needs the data's size, so it runs after the log's first lines: the
    refused run's directory (only .hydra/ and that log) is removed all the same."""
    proc = run_cli("train.py", "data=digits", "backbone=airbench", "backbone.width=4", "data.image_size=7",
                   "data.batch_size=2", "trainer.max_epochs=1", "trainer.progress=false",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: data.batch_size=2 leaves a last training batch of one image")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_an_epoch_ending_in_one_image_is_refused_only_when_the_run_reaches_it():
    from interconnects.config import ConfigError
    from interconnects.engine.run import _refuse_single_image_batches

    norm = "model.backbone.blocks.1.norm1 (input [1, 16, 1, 1])"
    with pytest.raises(ConfigError) as refused:  # 1293 images = 646 batches of 2 + 1
        _refuse_single_image_batches(norm, 2, 1293, None)
    assert str(refused.value).startswith("data.batch_size=2 leaves a last training batch of one image "
                                         "(1293 training images = 646 batches of 2 + 1)")
    assert "e.g. data.batch_size=3" in str(refused.value) and 1293 % 3 != 1
    _refuse_single_image_batches(norm, 2, 1293, 646)  # (the limited epoch never reaches the last batch)
    _refuse_single_image_batches(norm, 3, 1293, None)  # (no image left over)
    _refuse_single_image_batches(norm, 2, 1293 + 1, None)
    _refuse_single_image_batches(None, 1, None)  # (no layer that one image troubles)
    with pytest.raises(ConfigError, match=r"^data\.batch_size=1 leaves a training batch of one image"):
        _refuse_single_image_batches(norm, 1, None)


def test_the_single_value_check_changes_no_statistic_rng_or_mode():
    from conftest import compose
    from interconnects.data import data_info
    from interconnects.engine.build import build_task
    from interconnects.models.hybrid import single_value_norms

    cfg = compose(["data=digits", "backbone=airbench", "backbone.width=4", "data.image_size=7"])
    info = data_info(cfg.data)
    model = build_task(cfg, info).networks()["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    found = single_value_norms(model, info.in_channels, tuple(info.image_size))
    # the backbone's 1×1 map, the GNN's norms over a graph of one node, the decoder's 1×1 map
    assert found == [("backbone.blocks.1.norm1", (1, 16, 1, 1)), ("backbone.blocks.1.norm2", (1, 16, 1, 1)),
                     ("gnn.norms.0.norm", (1, 64)), ("gnn.norms.1.norm", (1, 64)), ("decoder.convs.0.1", (1, 32, 1, 1))]
    assert torch.equal(torch.random.get_rng_state(), state) and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # 13×13 images leave airbench a 3×3 map (nine values per channel, a graph of nine nodes): accepted
    cfg = compose(["data=digits", "backbone=airbench", "backbone.width=4", "data.image_size=13"])
    assert single_value_norms(build_task(cfg, data_info(cfg.data)).networks()["model"], 1, (13, 13)) == []


# ---- trainer.compile=true where the backend fails to compile (inductor's C++ error on gatedgcn) -----------

def test_a_backend_compile_failure_falls_back_to_the_uncompiled_model_with_one_warning(tmp_path, monkeypatch, caplog):
    """The backend is replaced by one that fails as inductor's C++ compile did; the step runs eagerly."""
    import torch._dynamo
    from torch._inductor.exc import CppCompileError

    from conftest import compose
    from interconnects.engine.loop import CompiledOrEager, Trainer

    calls = []

    def failing_backend(graph_module, example_inputs):
        calls.append(1)
        raise CppCompileError(["g++", "kernel.cpp"], "kernel.cpp:1: error: expected ';'")

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module: real_compile(module, backend=failing_backend))
    torch._dynamo.reset()
    cfg = compose(["data=digits", "trainer.compile=true", "trainer.device=cpu"])
    trainer = Trainer(cfg.trainer, tmp_path, {}, "none")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    x = torch.randn(5, 4)
    try:
        with caplog.at_level("WARNING", logger="interconnects"):
            first = trainer.forward(model, x)
            second = trainer.forward(model, x[:2])
    finally:
        torch._dynamo.reset()
    assert isinstance(trainer.wrap(model), CompiledOrEager) and trainer.wrap(model).failed
    assert calls == [1]  # compiled once, then never tried again
    assert torch.equal(first, model(x)) and torch.equal(second, model(x[:2]))
    first.sum().backward()  # the eager result trains the module's own parameters
    assert model[0].weight.grad is not None
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("trainer.compile=true: torch.compile could not compile Sequential")
    assert "runs uncompiled" in warning and "trainer.compile=false" in warning and "\n" not in warning
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("overrides, message", [
    (["data.eval_batch_size=1"], "error: data.eval_batch_size=1 is too small for task=gan: FID needs at least 2 images"),
    (["data.val_fraction=0.9995"], "error: data.val_fraction leaves 1 training image(s); task=gan measures FID"),
])
def test_a_gan_whose_fid_would_have_one_image_a_side_is_refused_before_any_work(tmp_path, overrides, message):
    """torchmetrics' FID needs two images on each side: an evaluation batch of one image (the first
    one is measured before training) or a training split of one, which the floor draws from, ended in
    its RuntimeError and a traceback, at the preflight or after training."""
    proc = run_cli("train.py", "data=digits", "task=gan", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                   "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "task.num_samples=16",
                   "task.generator.channels=4", "task.discriminator.channels=4", "trainer.progress=false",
                   *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(message), line
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


# ---- trainer.compile=true with R1: a double backward through a compiled discriminator -------------------

@pytest.mark.parametrize("r1_weight", [0.0, 1.0])
def test_a_compiled_gan_with_r1_trains_with_its_discriminator_uncompiled(tmp_path, monkeypatch, caplog, r1_weight):
    """``task=gan trainer.compile=true`` with R1 ended in a RuntimeError in the compiled backward
    (a buffer "modified by an inplace operation": torch.compile has no double backward, which the R1
    penalty takes); the discriminator now runs uncompiled, said in one warning, the generator compiled."""
    import torch._dynamo

    from conftest import compose
    from interconnects.engine.loop import CompiledOrEager, Trainer
    from test_tasks import make_optimize, tiny_gan

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module: real_compile(module, backend="aot_eager"))
    torch._dynamo.reset()
    cfg = compose(["data=digits", "trainer.compile=true", "trainer.device=cpu"])
    trainer = Trainer(cfg.trainer, tmp_path, {}, "none")
    torch.manual_seed(0)
    task = tiny_gan(r1_weight=r1_weight)
    optimize, _ = make_optimize(task)

    images = (torch.rand(6, 1, 28, 28) - 0.1307) / 0.3081
    try:
        with caplog.at_level("WARNING", logger="interconnects"):
            trainer.leave_uncompiled(task)
            if r1_weight:  # (two steps: the second reuses the compiled generator)
                for _ in range(2):
                    metrics = task.training_step((images, torch.zeros(6)), trainer.forward, optimize)
                assert all(torch.isfinite(v) for v in metrics.values())
    finally:
        torch._dynamo.reset()
    assert isinstance(trainer.wrap(task.generator), CompiledOrEager)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if r1_weight:
        assert trainer.wrap(task.discriminator) is task.discriminator
        assert warnings == ["trainer.compile=true: the discriminator runs uncompiled: task.r1_weight=1 "
                            "differentiates its gradient (R1), which torch.compile does not support"]
    else:
        assert isinstance(trainer.wrap(task.discriminator), CompiledOrEager) and warnings == []


# ---- a task config holding a key its task does not take ------------------------------------------------

@pytest.mark.parametrize("task, key", [("gan", "label_smoothing"), ("reconstruct", "tta")])
def test_a_task_key_of_another_task_is_refused_naming_it(task, key):
    """``experiment=cifar10_baseline task=gan`` kept the experiment's ``task.label_smoothing``: the GAN
    and the autoencoder said ``task: GANTask.__init__() got an unexpected keyword argument``; now the
    key is named as classification's ``task.*`` keys are."""
    from conftest import compose
    from interconnects.config import ConfigError
    from interconnects.data import data_info
    from interconnects.engine.build import build_task

    cfg = compose(["data=digits", f"task={task}", f"+task.{key}=0.2"])
    with pytest.raises(ConfigError) as caught:
        build_task(cfg, data_info(cfg.data))
    message = str(caught.value)
    name = {"gan": "GANTask", "reconstruct": "ReconstructionTask"}[task]
    assert message.startswith(f"task.{key} is not a setting of {name} (accepted: ") and "\n" not in message
    assert f"~task.{key}" in message and "in_channels" not in message.split("accepted: ")[1].split(")")[0]


def test_a_per_edge_layer_on_a_complete_graph_is_projected_at_its_measured_speed(caplog):
    """Found by the search: gnn=gat on 961 keypoints of a 31×31 image (a complete graph), batch 4,
    took 5.2 s a step where the multiply-add count projected 0.1 s (its steps are bound by memory);
    the per-edge tensors are now projected at their own measured rate."""
    [line] = _cost_warnings(caplog, "backbone=pixels", "gnn=gat", "interconnect=keypoints", "data.image_size=31",
                            "interconnect.num_keypoints=961", "gnn.hidden_channels=8", "gnn.num_layers=2",
                            "data.batch_size=4", "data.eval_batch_size=4")
    seconds = float(line.split("(about ")[1].split(" s ")[0])
    assert 2.6 <= seconds <= 10.4, line  # within 2× of the 5.2 s measured
    assert "961 nodes" in line and "data.batch_size=4" in line


def test_a_decoder_that_halves_a_one_cell_map_is_refused_before_any_work():
    """Found by the search: decoder=airbench (a 2×2 max-pool) after simple_cnn at output stride 8 on
    13×13 images (a 1×1 map) ended in torch's "Output size is too small" with a traceback."""
    from conftest import compose
    from interconnects.config import ConfigError
    from interconnects.models.hybrid import build_hybrid

    cfg = compose(["data=digits", "decoder=airbench", "data.image_size=13", "backbone.output_stride=8",
                   "backbone.width=4"])
    with pytest.raises(ConfigError) as caught:
        build_hybrid(cfg, 1, (13, 13))
    message = str(caught.value)
    assert message.startswith("decoder: AirbenchDecoder cannot take the backbone's 1x1 feature map (") and "\n" not in message
    assert "data.image_size" in message and "backbone.output_stride" in message


@pytest.mark.parametrize("machine, units, lacks", [("x86_64", (False, False), True), ("x86_64", (True, False), False),
                                                   ("x86_64", (False, True), False), ("aarch64", (False, False), False)])
def test_bf16_on_a_cpu_without_bf16_units_is_remarked(monkeypatch, tmp_path, caplog, machine, units, lacks):
    """On an x86 CPU with neither AVX512-BF16 nor AMX, bf16 products are emulated (a step measured 11×
    slower than float32): trainer.precision=bf16 there gets one warning line; elsewhere none."""
    import platform

    from conftest import compose
    from interconnects.engine import device
    from interconnects.engine.loop import Trainer

    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: units[0])
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: units[1])
    assert device.cpu_lacks_bf16_units() is lacks
    cfg = compose(["data=digits", "trainer.precision=bf16", "trainer.device=cpu"])
    with caplog.at_level("WARNING", logger="interconnects"):
        Trainer(cfg.trainer, tmp_path, {}, "none")
    remarks = [r.getMessage() for r in caplog.records if "without bf16 units" in r.getMessage()]
    assert len(remarks) == (1 if lacks else 0) and all("trainer.precision=32" in r for r in remarks)
