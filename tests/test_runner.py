"""common.runner: the shared epoch loop, run opening, RNG states and layer selection, on their own."""
import json
import os
import random
from types import SimpleNamespace

import pytest
import torch

from common import UserError, runner
from common.checkpoint import BEST, CHECKPOINT


def _ctx():
    return SimpleNamespace(distributed=False, is_main=True, rank=0, world_size=1, device=torch.device("cpu"))


def _loop(tmp_path, scores, every=1, start=0, best=None, history=()):
    """Run runner.epochs with scripted evaluation scores; returns (best, history, the states saved)."""
    args = SimpleNamespace(epochs=len(scores))
    saved = []

    def state(done, b, hist):
        saved.append((done, b))
        return {"epoch": done, "best": b, "weights": torch.tensor([float(done)]), "optimizer": {}, "history": hist}
    return (*runner.epochs(args, _ctx(), str(tmp_path), start=start, best=best, history=list(history), key="test_x",
                           best_name="best_x", train_epoch=lambda e: {"train_loss": 1.0 / (e + 1), "lr": 0.1},
                           evaluate=lambda e: {"test_x": scores[e]}, state=state, summary={"m": 1}, every=every),
            saved)


def test_epochs_keep_the_best_and_save_it(tmp_path):
    best, hist, saved = _loop(tmp_path, [3.0, 5.0, 4.0])
    assert best == 5.0 and [h["best_x"] for h in hist] == [3.0, 5.0, 5.0]
    assert [h["test_x"] for h in hist] == [3.0, 5.0, 4.0] and hist[0]["train_loss"] == 1.0
    assert torch.load(tmp_path / BEST, weights_only=True)["weights"].item() == 2.0       # epoch 2 was the best
    last = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert last["epoch"] == 3 and "optimizer" in last
    assert "optimizer" not in torch.load(tmp_path / BEST, weights_only=True)            # the training state stays out
    assert json.load(open(tmp_path / "history.json"))["m"] == 1 and saved[-1] == (3, 5.0)


def test_epochs_evaluate_every_n_and_after_the_last(tmp_path):
    best, hist, _ = _loop(tmp_path, [9.0, 1.0, 2.0, 3.0, 4.0], every=2)
    assert ["test_x" in h for h in hist] == [False, True, False, True, True]
    assert hist[0]["best_x"] is None and best == 4.0                                   # 9.0 was never evaluated
    assert not os.path.exists(tmp_path / "unused")


def test_epochs_continue_a_resumed_run(tmp_path):
    best, hist, _ = _loop(tmp_path, [7.0, 7.0, 6.0], start=2, best=7.0, history=[{"epoch": 1}, {"epoch": 2}])
    assert best == 7.0 and [h["epoch"] for h in hist] == [1, 2, 3]
    assert not os.path.exists(tmp_path / BEST)                                         # 6.0 does not beat 7.0


def test_write_training_records_the_best_epoch(tmp_path):
    args = SimpleNamespace(epochs=3, metrics_out="", plot=True, seed=None)
    hist = [{"epoch": 1, "train_loss": 2.0, "lr": 0.1, "test_x": 1.0}, {"epoch": 2, "train_loss": 1.0, "lr": 0.1},
            {"epoch": 3, "train_loss": 0.5, "lr": 0.01, "test_x": 3.0}]
    rec = runner.write_training(args, str(tmp_path), hist, start=0, key="test_x", label="x (%)", title="t",
                                result=lambda top: {"x": top["test_x"]}, record=lambda res: dict(res))
    assert rec == {"x": 3.0, "best_epoch": 3, "epochs": 3}
    assert json.load(open(tmp_path / "metrics_ann.json"))["best_epoch"] == 3
    assert os.path.getsize(tmp_path / "metrics_ann_curves.png") > 1000
    with pytest.raises(UserError, match="nothing was trained"):
        runner.write_training(args, str(tmp_path), [], start=3, key="test_x", label="", title="",
                              result=dict, record=dict)


def test_open_run_refuses_a_used_folder_and_reads_the_resume_checkpoint(tmp_path):
    args = SimpleNamespace(resume="", init="", fresh=False)
    assert runner.open_run(args, str(tmp_path / "new")) == ("", None, None)
    torch.save({"epoch": 1, "optimizer": {}, "state_dict": {"w": torch.ones(1)}}, tmp_path / CHECKPOINT)
    with pytest.raises(UserError, match="--resume auto"):
        runner.open_run(args, str(tmp_path))
    args.resume = "auto"
    path, rckpt, ickpt = runner.open_run(args, str(tmp_path))
    assert path == str(tmp_path / CHECKPOINT) and rckpt["epoch"] == 1 and ickpt is None
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "model.pth")
    with pytest.raises(UserError, match="without training state"):
        runner.open_run(SimpleNamespace(resume=str(tmp_path / "model.pth"), init="", fresh=False), str(tmp_path))


def test_rng_states_round_trip():
    ctx = _ctx()
    random.seed(3)
    torch.manual_seed(3)
    states = runner.rng_states(ctx)
    a = (random.random(), torch.rand(2))
    assert runner.restore_rng({"rng_state": states}, ctx) == "RNG states restored"
    b = (random.random(), torch.rand(2))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert "holds none" in runner.restore_rng({}, ctx)
    assert "saved by 2 process(es)" in runner.restore_rng({"rng_state": states * 2}, ctx)


def test_select_layers_by_glob():
    net = SimpleNamespace(neurons=lambda: {"layer1.0.act1": 0, "layer1.0.act2": 0, "layer2.0.act1": 0})
    assert runner.select_layers(net, "") is None
    assert runner.select_layers(net, "layer1.*") == ["layer1.0.act1", "layer1.0.act2"]
    assert runner.select_layers(net, " layer2.0.act1 , layer1.0.act2") == ["layer1.0.act2", "layer2.0.act1"]
    with pytest.raises(UserError, match="matches none"):
        runner.select_layers(net, "fc*")


def test_an_evaluation_on_other_data_than_the_checkpoints_gets_its_own_file():
    """A VOC model scored on a COCO root of the same classes writes ``..._coco.json``, not over the VOC
    evaluation; ``coco-val`` of a ``coco`` model (or an unrecorded dataset) keeps the plain name."""
    from types import SimpleNamespace

    from common.runner import data_tag
    assert data_tag(SimpleNamespace(name="coco"), {"dataset": "voc"}) == "_coco"
    assert data_tag(SimpleNamespace(name="voc"), {"dataset": "coco"}) == "_voc"
    assert data_tag(SimpleNamespace(name="coco-val"), {"dataset": "coco"}) == ""
    assert data_tag(SimpleNamespace(name="voc"), {"dataset": "voc"}) == ""
    assert data_tag(SimpleNamespace(name="voc"), {}) == ""


def test_drawings_get_one_name_each_and_never_replace_an_input(tmp_path):
    """``x.jpg`` / ``x.png`` / ``x_jpg.png`` get three names; a single image may be drawn into its own folder
    (nothing is replaced), a folder of several may not, nor may a drawing replace an input."""
    from common import UserError
    from common.runner import output_paths
    names = output_paths(["/a/x.jpg", "/a/x.png", "/a/x_jpg.png"], "/o", [".png"], "--out")
    assert [os.path.basename(p[0]) for p in names] == ["x_jpg.png", "x_png.png", "x_jpg_2.png"]
    d = str(tmp_path)
    assert output_paths([os.path.join(d, "x.jpg")], d, ["_mask.png"], "--output") == [[os.path.join(d, "x_mask.png")]]
    for files in ([os.path.join(d, "x.png")], [os.path.join(d, "x.jpg"), os.path.join(d, "y.jpg")]):
        with pytest.raises(UserError, match="holds the input images"):
            output_paths(files, d, [".png"], "--out")
    open(os.path.join(d, "x.png"), "w").close()     # another photo beside x.jpg is never replaced
    with pytest.raises(UserError, match="x.png exists beside the input image"):
        output_paths([os.path.join(d, "x.jpg")], d, [".png"], "--out")


def test_class_names_check_takes_the_background_spellings_as_one():
    from common import UserError
    from common.checkpoint import check_class_names
    check_class_names(["background", "cat"], ["_background_", "cat"], "--init", "x")
    check_class_names(["pottedplant", "tvmonitor"], ["potted plant", "tv/monitor"], "--init", "x")   # labelme's VOC
    with pytest.raises(UserError, match="class 1 is 'cat' there and 'dog' here"):
        check_class_names(["background", "cat"], ["background", "dog"], "--init", "x")


def test_amp_step_runs_the_forward_in_bfloat16_and_keeps_float32_state():
    """``sgd_step(amp=True)``: the convolutions run in bfloat16 autocast, the loss is computed on float32
    outputs and the parameters, gradients and optimizer state stay float32; the loss is the float32
    loss up to bfloat16 rounding. Without ``amp`` the forward pass is float32."""
    import torch.nn as nn

    from common import runs
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5))
    seen = []
    net[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x, y = torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 3])
    ref = nn.functional.cross_entropy(net(x), y).item()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    before = net[0].weight.detach().clone()
    seen.clear()
    out, loss = runs.sgd_step(net, x, y, nn.functional.cross_entropy, opt, 1, 1, amp=True)
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    assert loss.item() == pytest.approx(ref, rel=2e-2) and loss.item() != ref
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net.parameters())
    assert all(v.dtype == torch.float32 for s in opt.state.values() for k, v in s.items() if k != "step")
    assert not torch.equal(net[0].weight, before)
    seen.clear()
    runs.sgd_step(net, x, y, nn.functional.cross_entropy, opt, 1, 2)
    assert seen == [torch.float32]


def test_amp_on_a_gpu_without_bfloat16_is_a_user_error(monkeypatch):
    from common import runs
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(UserError, match="--amp needs bfloat16"):
        runs.check_amp(True, "cuda")
    runs.check_amp(False, "cuda")
