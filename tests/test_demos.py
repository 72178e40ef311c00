"""The offline detection / segmentation demos: the time-left estimate, resuming a killed demo, the side-by-side
ANN / SNN drawings."""
from __future__ import annotations

import os

import pytest

from common import UserError
from common.scenes import DEBIAN_FASHION_MNIST
from common.stages import StageClock

needs_fmnist = pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST),
                                  reason="dataset-fashion-mnist is not installed (scripts/setup.sh)")


def test_stage_clock_scales_the_plan_by_the_measured_speed(capsys, monkeypatch):
    now = [100.0]
    monkeypatch.setattr("common.stages.time.time", lambda: now[0])
    clock = StageClock({"a": 10.0, "b": 30.0, "c": 60.0})
    assert clock.left() is None

    def work(seconds):
        def fn(argv):
            now[0] += seconds
            return argv
        return fn
    assert clock.run("a", "x.py", work(20.0), ["--n", "1"]) == ["--n", "1"]   # 2 s per unit of work
    assert clock.left() == pytest.approx(2.0 * 90)
    clock.skip("b", "done before")                                         # a finished stage leaves the plan
    assert clock.left() == pytest.approx(2.0 * 60)
    clock.run("c", "x.py", work(60.0), [])                                 # now 80 s for 70 units
    assert clock.left() == pytest.approx(0.0)
    out = capsys.readouterr().out
    assert "+ python x.py --n 1" in out and "=== a: 20 s (total 0.3 min, about 3.0 min left)" in out
    assert "=== b: done before (done before)" in out
    assert [s["step"] for s in clock.steps] == ["a", "b", "c"] and clock.steps[1]["seconds"] == 0.0


@needs_fmnist
def test_segmentation_demo_resumes_and_draws_ann_and_snn_side_by_side(tmp_path, capsys):
    from segmentation import demo
    out = str(tmp_path / "seg")
    argv = ["--quick", "--out", out, "--no-progress", "--test", "3"]
    s = demo.main(argv)
    assert s["pretrain_accuracy"] is not None and len(s["rows"]) == 4
    assert all(isinstance(n, str) and n for n in s["finetune_accepted"])   # the accepted layers, by name
    for i in range(3):
        assert os.path.isfile(os.path.join(out, f"masks_{i}.png"))
    first = capsys.readouterr().out
    assert "about" in first                                                # the time-left estimate
    assert first.count("--epochs 1 --eval_epoch 1") == 4                   # each stage: one evaluation, at its end
    again = demo.main(argv)                                                # a rerun reuses the finished stages
    text = capsys.readouterr().out
    assert text.count("done before") == 11 and again["rows"][1:] == s["rows"][1:]   # 4 trainings, 6 SNNs, the tuning
    with pytest.raises(UserError, match="other settings.*--seed"):
        demo.main(argv + ["--seed", "1"])
    assert demo.main(argv + ["--seed", "1", "--fresh", "--pretrain-epochs", "0"])["pretrain_accuracy"] is None


@needs_fmnist
def test_detection_demo_resumes_and_draws_ann_and_snn_side_by_side(tmp_path, capsys):
    from PIL import Image

    from detection import offline_demo as O
    out = str(tmp_path / "det")
    argv = ["--out", out, "--train", "8", "--test", "4", "--size", "64", "--width", "0.125", "--pretrain", "32",
            "--pretrain-epochs", "1", "--pretrain-size", "32", "--epochs-fp", "1", "--epochs-q", "1",
            "--batch-size", "4", "--ft-iters", "1", "--workers", "0"]
    s = O.main(argv)
    pairs = sorted(f for f in os.listdir(out) if f.startswith("boxes_") and f.endswith(".png"))
    assert len(pairs) == 4
    name = pairs[0][len("boxes_"):]
    with Image.open(os.path.join(out, pairs[0])) as both, Image.open(os.path.join(out, "boxes_ann", name)) as ann:
        assert both.width == 2 * ann.width + 8 and both.height == ann.height
    capsys.readouterr()
    again = O.main(argv)
    assert capsys.readouterr().out.count("done before") == 12 and again["table"] == s["table"]


@pytest.mark.parametrize("task, argv, match", [
    ("detection", ["--size", "100"], r"--size 100 is not a multiple of 32.*e\.g\. 96"),
    ("detection", ["--epochs-q", "0"], "--epochs-q 0 must be at least 1"),
    ("detection", ["--pretrain-size", "80"], r"--pretrain-size 80 is not a multiple of 32.*e\.g\. 64"),
    ("detection", ["--pretrain-epochs", "0"], "--pretrain 32000 with --pretrain-epochs 0"),
    ("detection", ["--lr-q", "0"], "--lr-q 0 must be positive"),
    ("detection", ["--workers", "-1"], "--workers -1 must not be negative"),
    ("segmentation", ["--crop", "64"], "--crop 64 does not fit deeplabv1_vgg9.*e\\.g\\. 65"),
    ("segmentation", ["--scales", "0"], "--scales 0: every factor"),
    ("segmentation", ["--width", "0"], "--width 0 must be positive"),
    ("segmentation", ["--max-items", "0"], "--max-items 0 must be at least 1"),
    ("detection", ["--scale", "0.5", "2"], r"--scale 0\.5 2: the item sizes must satisfy"),
    ("segmentation", ["--item-scale", "0.9", "0.5"], r"--item-scale 0\.9 0\.5: .*pass e\.g\. --item-scale"),
    ("segmentation", ["--test", "0"], "--test 0: both splits"),
])
def test_demo_flags_are_checked_before_anything_is_written(tmp_path, task, argv, match):
    if task == "detection":
        from detection.offline_demo import main
    else:
        from segmentation.demo import main
    out = tmp_path / "demo"
    with pytest.raises(UserError, match=match):
        main(["--out", str(out)] + argv)
    assert not out.exists()                                # nothing rendered, no settings stamp


def test_detection_pretraining_canvases_follow_the_scene_items():
    """Without --pretrain-size the canvases' items (0.6-1.0 x the side) match the scenes' largest items:
    96 at the default 128 px and scale 0.45-0.75, 64 at --size 96 (the 96-px recipe), a multiple of 32."""
    from detection.offline_demo import get_parser, pretrain_size
    args = get_parser().parse_args([])
    assert args.pretrain_size is None and pretrain_size(args.size, args.scale) == 96
    assert pretrain_size(96, (0.45, 0.75)) == 64 and pretrain_size(256, (0.2, 0.5)) == 128
    assert pretrain_size(64, (0.1, 0.2)) == 32                          # never below the stride
