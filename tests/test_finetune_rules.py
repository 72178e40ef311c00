"""The fine-tuner's step floor (``snn.finetune(min_steps=...)``, ``--min-steps``): a fine-tuning set of fewer
batches than the floor is cycled, in the layer-wise stage and in every end-to-end epoch; a set at least that
large, or a pass cut by ``max_batches``, runs exactly as before; the regime benchmark's table and crops."""
import copy
import importlib
import json
import os
import sys

import pytest
import torch

import snn
from snn.calibrate import epoch_plan

sys.path.insert(0, os.path.dirname(__file__))
from test_snn import _trained_tiny_resnet  # noqa: E402

ft = importlib.import_module("snn.finetune")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
    ann, batches = _trained_tiny_resnet(steps=30)
    return ann, snn.convert(ann), batches[:3], batches[8:12]


@pytest.mark.parametrize("min_steps, n, cap, plan", [
    (None, 6, None, (1, 6)),     # the original: one pass
    (50, 6, None, (9, 54)),      # 600 images in batches of 100: nine passes
    (50, 6, 63, (9, 54)),        # the cap is above the cycled steps
    (50, 6, 20, (4, 20)),        # ... or cuts the last pass
    (50, 63, None, (1, 63)),     # the demo's 63 batches: unchanged
    (50, 50, None, (1, 50)),
    (50, 49, None, (2, 98)),
    (50, 16, 16, (1, 16)),       # the pass is cut at max_batches: the set is not small, the cap is the user's
    (50, None, None, (1, None)),  # unknown length: one pass
])
def test_epoch_plan(min_steps, n, cap, plan):
    assert epoch_plan(min_steps, n, cap) == plan


def _run(ann, net, train, **kw):
    return snn.finetune(ann, net, train, epochs=1, lr=1e-2, progress=False, log=lambda s: None,
                        method="fastsnn+e2e", e2e_loss="mse", e2e_epochs=2, **kw)


def _strip(hist):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in hist]


def test_a_set_of_at_least_min_steps_batches_runs_as_before_bit_for_bit(tiny):
    ann, net0, train, held_out = tiny
    for before, after in (({}, {"min_steps": len(train)}), ({"max_batches": 2}, {"min_steps": 50, "max_batches": 2})):
        runs = []
        for kw in (before, after):
            net = copy.deepcopy(net0)
            runs.append((_strip(_run(ann, net, train, force=False, accept="local", local_batches=2, **kw)), net))
        (h0, n0), (h1, n1) = runs
        assert h1 == h0
        s0, s1 = n0.ann_state_dict(), n1.ann_state_dict()
        assert all(torch.equal(s0[k], s1[k]) for k in s0)


def test_a_small_set_is_cycled_in_both_stages(tiny, monkeypatch):
    """3 batches, min_steps 8: every layer-wise epoch makes three full passes (9 steps), judged once; every
    end-to-end epoch 9 steps too."""
    ann, net0, train, held_out = tiny
    steps, real = [], ft._tune_epoch

    def counting(*a, **k):
        out = real(*a, **k)
        steps.append(len(out))
        return out
    monkeypatch.setattr(ft, "_tune_epoch", counting)
    calls = []

    def loss(out, ref, batch):
        calls.append(1)
        return ((out - ref) ** 2).mean()
    net = copy.deepcopy(net0)
    hist = snn.finetune(ann, net, train, epochs=1, lr=1e-2, progress=False, log=lambda s: None, method="fastsnn+e2e",
                        e2e_loss=loss, e2e_epochs=2, min_steps=8)
    layers = [h for h in hist if h["layer"] != "end-to-end"]
    assert steps == [3, 3, 3] * len(layers) and all(len(h["epochs"]) == 1 for h in layers)
    assert len(calls) == 2 * 9 and len(hist[-1]["epochs"]) == 2


def test_min_steps_with_the_cosine_schedule_decays_over_the_cycled_steps(tiny, monkeypatch):
    ann, net0, train, _ = tiny
    lrs = []
    real_step = torch.optim.SGD.step

    def step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    snn.finetune(ann, copy.deepcopy(net0), train, epochs=1, lr=1e-2, progress=False, log=lambda s: None,
                 schedule="cosine", min_steps=7, layers=["b1.act1"])
    assert len(lrs) == 9 and lrs == sorted(lrs, reverse=True) and lrs[0] == 1e-2 and lrs[-1] > 0


def test_bad_min_steps(tiny):
    ann, net0, train, _ = tiny
    with pytest.raises(ValueError, match="min_steps"):
        snn.finetune(ann, copy.deepcopy(net0), train, min_steps=0, progress=False)


def test_the_method_flags_carry_min_steps_except_for_the_original(tmp_path):
    from classification import workflow
    from classification.cifar10 import snn_ft
    from common import pipeline
    parse = lambda *a: snn_ft.get_parser().parse_args(["--data", str(tmp_path), *a])  # noqa: E731
    assert workflow.method_options(parse())["min_steps"] == pipeline.MIN_STEPS
    assert workflow.method_options(parse("--min-steps", "20"))["min_steps"] == 20
    assert "min_steps" not in workflow.method_options(parse("--min-steps", "0"))
    assert workflow.method_options(parse("--method", "fastsnn")) == {}  # the original algorithm
    assert workflow.method_options(parse("--method", "fastsnn", "--force")) == {}


def test_object_crops_are_a_deterministic_image_folder(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    fr = importlib.import_module("fidelity_regimes")
    a = fr.object_crops(str(tmp_path / "a"), 12, 6, seed=3)
    b = fr.object_crops(str(tmp_path / "b"), 12, 6, seed=3)
    files = lambda r, s: sorted(os.path.relpath(os.path.join(d, f), os.path.join(r, s))  # noqa: E731
                                for d, _, fs in os.walk(os.path.join(r, s)) for f in fs)
    assert len(files(a, "train")) == 12 and len(files(a, "val")) == 6
    assert files(a, "train") == files(b, "train")
    for f in files(a, "train"):
        with open(os.path.join(a, "train", f), "rb") as fa, open(os.path.join(b, "train", f), "rb") as fb:
            assert fa.read() == fb.read()
    from PIL import Image
    im = Image.open(os.path.join(a, "train", files(a, "train")[0]))
    assert im.size == (32, 32) and im.mode == "RGB"
    assert fr.object_crops(a, 12, 6, seed=3) == a  # written once
    with pytest.raises(SystemExit, match="other parameters"):
        fr.object_crops(a, 12, 6, seed=4)


def test_regime_table_from_cells(tmp_path):
    """The table: mean and spread (half the range) over the seeds, the gap to the ANN, the settle check."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    fr = importlib.import_module("fidelity_regimes")
    args = fr.get_parser().parse_args(["--out", str(tmp_path), "--chain-seed", "0", "--results", str(tmp_path / "t")])

    def cell(seed, label, top1, ann):
        res = {"ann_top1": ann, "snn_top1": 20.0}
        if label is None:
            res["settle"] = {"K": fr.SETTLE_K, "sweep": [{"top1": ann, "ann_top1": ann, "min_agreement": 1.0}]}
        else:
            res["methods"] = [{"top1": top1, "accepted": "3/4", "seconds": 1.0}]
        with open(fr.cell_path(args, "small", seed, label or "settle"), "w") as f:
            json.dump(res, f)
    cell(0, None, None, 70.0)
    for seed, (a, b) in enumerate(((60.0, 68.0), (64.0, 69.0))):
        cell(seed, "force", a, 70.0)
        cell(seed, "default", b, 70.0)
    res = fr.main(["--out", str(tmp_path), "--chain-seed", "0", "--results", str(tmp_path / "t"), "--table-only",
                   "--regimes", "small", "--methods", "force,default"])
    rows = {r["method"]: r for r in res["rows"]}
    assert (rows["force"]["mean"], rows["force"]["spread"], rows["force"]["gap"]) == (62.0, 2.0, 8.0)
    assert (rows["default"]["mean"], rows["default"]["spread"]) == (68.5, 0.5)
    assert res["settle"]["small"][0]["exact"]
    md = (tmp_path / "t.md").read_text()
    assert "62.0 ± 2.0" in md and "--table-only" not in md and "--chain-seed 0" in md
    assert os.path.isfile(tmp_path / "t.json") and "`small`: " in md


def test_regime_benchmark_quick_run_and_reuse(tmp_path):
    """Cells through classification.fidelity on a tiny chain: settle check, two methods, the table; a second
    run reuses every cell."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    fr = importlib.import_module("fidelity_regimes")
    argv = ["--quick", "--out", str(tmp_path), "--regimes", "small", "--seeds", "0", "--methods", "force,local",
            "--results", str(tmp_path / "t")]
    res = fr.main(argv)
    assert [r["method"] for r in res["rows"]] == ["force", "local"] and 0 in res["settle"]["small"]
    cell = fr.cell_path(fr.get_parser().parse_args(argv), "small", 0, "force")
    with open(cell) as f:
        assert json.load(f)["ft_subset"] == 48  # --quick caps the 600-image fine-tuning set
    mtime = os.path.getmtime(cell)
    fr.main(argv)
    assert os.path.getmtime(cell) == mtime


def test_regime_benchmark_detection_quick_run(tmp_path):
    """The detection regime on a tiny demo chain: the settle check and two methods through the task's own
    scripts, cells in the classification cells' format, the table; methods without a detection form skipped."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    fr = importlib.import_module("fidelity_regimes")
    argv = ["--quick", "--out", str(tmp_path), "--regimes", "yolo", "--seeds", "0", "--chain-seed", "0",
            "--methods", "force,default,local", "--results", str(tmp_path / "t")]
    res = fr.main(argv)
    assert [r["method"] for r in res["rows"]] == ["force", "default"]  # `local` has no detection form
    settle = res["settle"]["yolo"][0]
    assert 0.0 <= settle["top1"] <= 100.0 and settle["min_agreement"] is not None
    args = fr.get_parser().parse_args(argv)
    with open(fr.cell_path(args, "yolo", 0, "force")) as f:
        cell = json.load(f)
    kept, layers = cell["methods"][0]["accepted"].split("/")
    assert cell["task"] == "detection" and "--force" in cell["argv"] and kept == layers != "0"  # --force keeps all
    with open(fr.cell_path(args, "yolo", 0, "default")) as f:
        assert "--force" not in json.load(f)["argv"]
    assert "mAP@0.5" in (tmp_path / "t.md").read_text()
