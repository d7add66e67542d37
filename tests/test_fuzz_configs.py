"""scripts/fuzz_configs.py: the random-configuration search composes reproducibly from every
config group, tells trained, cleanly refused and every other outcome apart, and a short search of
real configurations ends with none of the third kind."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from conftest import CONFIGS, ROOT

SCRIPT = ROOT / "scripts" / "fuzz_configs.py"


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_configs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_configs"] = module
    spec.loader.exec_module(module)
    return module


def test_a_short_search_trains_or_cleanly_refuses_every_configuration(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--n", "6", "--seed", "3", "--timeout", "600",
                           "--json", str(tmp_path / "runs.json")], cwd=ROOT, capture_output=True, text=True,
                          timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    import json

    runs = json.loads((tmp_path / "runs.json").read_text())
    assert len(runs) == 6 and {r["outcome"] for r in runs} <= {"trained", "refused"}
    assert any(r["outcome"] == "trained" for r in runs)
    assert "| neither | 0 |" in proc.stdout
    assert sum(line.startswith("[") for line in proc.stdout.splitlines()) == 6  # one progress line a run


def test_every_group_folder_and_option_is_listed_at_run_time(fuzz, tmp_path):
    groups = fuzz.group_options()
    expected = {p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name != "hydra"}
    assert set(groups) == expected
    assert groups["gnn"] == sorted(p.stem for p in (CONFIGS / "gnn").glob("*.yaml"))
    (tmp_path / "gnn").mkdir()
    for name in ("gcn", "brand_new"):
        (tmp_path / "gnn" / f"{name}.yaml").write_text("layer: gcn\n")
    assert fuzz.group_options(tmp_path) == {"gnn": ["brand_new", "gcn"]}


def test_the_same_seed_composes_the_same_configurations_and_a_longer_search_extends_a_shorter(fuzz):
    first = fuzz.Composer(5, "SAMPLE").specs(12)
    again = fuzz.Composer(5, "SAMPLE").specs(16)
    assert [s.overrides for s in first] == [s.overrides for s in again[:12]]
    assert [s.overrides for s in fuzz.Composer(6, "SAMPLE").specs(12)] != [s.overrides for s in first]
    for spec in again:
        assert any(o.startswith("data=") for o in spec.overrides)
        assert any(o.startswith("trainer.limit_train_batches=") for o in spec.overrides)
        if spec.parent is not None:
            assert spec.parent < spec.index and spec.parent_key in ("ckpt_path", "init_from")


def test_the_edges_of_the_numeric_keys_are_tried(fuzz):
    words = [o for s in fuzz.Composer(0, "SAMPLE").specs(60) for o in s.overrides]
    for edge in ("data.batch_size=1", "data.batch_size=3", "trainer.limit_train_batches=1",
                 "trainer.limit_train_batches=7", "trainer.max_epochs=2", "data.val_fraction=0",
                 "gnn.num_layers=0", "gnn.hidden_channels=1", "trainer.precision=bf16", "trainer.channels_last=true",
                 "interconnect.k=1", "data.root=SAMPLE"):
        assert edge in words, edge
    assert any(w.startswith("trainer.grad_clip=") for w in words)
    assert any(w.startswith("trainer.lookahead_every=") for w in words)
    assert any(w.startswith("data.augment=") for w in words)
    assert any(w.startswith("data.image_size=") and int(w.split("=")[1]) % 4 for w in words)


FAKE = '''
import sys
from pathlib import Path

what = dict(a.split("=", 1) for a in sys.argv[1:]).get("what")
if what == "crash":
    raise RuntimeError("boom")
if what == "trained":
    run = Path("outputs/train/run")
    run.mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    sys.exit(0)
if what == "no_metrics":
    sys.exit(0)
if what in ("refused", "leftover", "two_lines"):
    if what == "leftover":
        Path("outputs/train/run/.hydra").mkdir(parents=True)
    print("error: what=" + what + " is not supported", file=sys.stderr)
    if what == "two_lines":
        print("error: and another", file=sys.stderr)
    sys.exit(2)
import time
if what == "slow":  # warned before its first step, as train.py does, then still training at the limit
    print("[...][interconnects][WARNING] - expect slow steps: 7 GMAC a training step (about 90.0 s on a 2-core CPU)")
    sys.stdout.flush()
if what == "warned_late":  # the warning after training began does not count
    print("[...][interconnects.engine.loop][INFO] - first training step: 90 s")
    print("[...][interconnects][WARNING] - expect slow steps: 7 GMAC a training step")
    sys.stdout.flush()
time.sleep(60)
'''


@pytest.mark.parametrize("spawn", [True, False])
def test_outcomes_are_told_apart_and_every_other_one_is_listed_with_its_command(fuzz, tmp_path, spawn, capsys):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE)
    kinds = ["trained", "refused", "crash", "no_metrics", "leftover", "two_lines", "hang", "slow", "warned_late"]
    specs = [fuzz.Spec(i, [f"what={k}"]) for i, k in enumerate(kinds)]
    runner = fuzz.Runner(tmp_path / "root", timeout=5, jobs=3, spawn=spawn, script=script)
    results = {r.spec.overrides[0][5:]: r for r in runner.run(specs)}
    assert {k: r.outcome for k, r in results.items()} == {
        "trained": "trained", "refused": "refused", "crash": "other", "no_metrics": "other", "leftover": "other",
        "two_lines": "other", "hang": "other", "slow": "slow", "warned_late": "other"}
    assert "about 90.0 s" in results["slow"].reason and "5 s limit" in results["slow"].reason
    assert "exit 1" in results["crash"].reason and "a traceback" in results["crash"].reason
    assert "RuntimeError: boom" in results["crash"].reason
    assert "without metrics.json" in results["no_metrics"].reason
    assert "left outputs/train/run behind" in results["leftover"].reason
    assert "2 'error:' lines" in results["two_lines"].reason
    assert "no exit within 5 s" in results["hang"].reason and results["hang"].seconds < 30
    assert results["refused"].reason == "error: what=refused is not supported"
    status = fuzz.report(list(results.values()), "SAMPLE", 1.0)
    out = capsys.readouterr().out
    assert status == 1 and "| neither | 6 |" in out and "python train.py what=crash" in out
    assert "| slow (warned before training, still training at the time limit) | 1 |" in out
    assert "(slow, warned)" in out and "python train.py what=slow" in out
    assert fuzz.report([results["trained"], results["refused"], results["slow"]], "SAMPLE", 1.0) == 0


def test_a_resume_names_the_earlier_run_and_a_refused_one_must_leave_it_as_it_was(fuzz, tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE + "\n")
    # the resumed run's directory is changed by the "refusal": that is neither outcome
    script.write_text('''
import sys
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[1:])
if "ckpt_path" in args:
    run = Path(args["ckpt_path"]).parent.parent
    (run / "train.log").write_text("touched")
    print("error: refused", file=sys.stderr)
    sys.exit(2)
run = Path("outputs/train/run")
(run / "checkpoints").mkdir(parents=True)
(run / "metrics.json").write_text("{}")
''')
    specs = [fuzz.Spec(0, ["x=1"]), fuzz.Spec(1, ["x=1"], parent=0, parent_key="ckpt_path", parent_file="last.ckpt",
                                              kind="resume")]
    first, resumed = fuzz.Runner(tmp_path / "root", timeout=30, jobs=2, spawn=True, script=script).run(specs)
    assert first.outcome == "trained"
    assert resumed.argv[-1] == f"ckpt_path={first.run_dir / 'checkpoints' / 'last.ckpt'}"
    assert resumed.outcome == "other" and "was changed" in resumed.reason
