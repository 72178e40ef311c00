"""common/: one-line errors, atomic checkpoints, metrics, DDP helpers, plots, TensorBoard."""
import collections
import json
import os
import socket
import sys

import pytest
import torch

import quant
import snn
from common import UserError, run_cli
from common import checkpoint as ck
from common import dist, metrics, plots
from common.cli import ArgumentParser, plain_args, unshadow_script_dir
from common.errors import format_error
from common.logger import TensorBoard
from spawn_util import spawn


def _one_line_error(capsys, fn, code=2):
    with pytest.raises(SystemExit) as e:
        fn()
    assert e.value.code == code
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("exc, needle", [
    (UserError("bad thing", "do this"), "error: bad thing — do this"),
    (quant.CheckpointMismatchError("checkpoint does not match the model: missing keys [a]"), "— check"),
    (snn.ConversionError("the model has no QuantAct activation"), "— convert a model"),
    (FileNotFoundError(2, "No such file or directory", "/x/y"), "/x/y"),
    (FloatingPointError("fine-tuning loss became nan"), "— lower"),
    (UserError("multi\nline\nmessage"), "error: multi line message"),
])
def test_run_cli_prints_one_line_and_exits_2(capsys, exc, needle):
    def main(argv):
        raise exc
    line = _one_line_error(capsys, lambda: run_cli(main, []))
    assert needle in line


def test_run_cli_passes_success_and_bugs_through(capsys):
    assert run_cli(lambda argv: None, []) == 0
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_cli(lambda argv: 1 / 0, [])


def test_run_cli_interrupt_exit_130(capsys):
    def main(argv):
        raise KeyboardInterrupt
    line = _one_line_error(capsys, lambda: run_cli(main, []), code=130)
    assert "--resume" in line


def test_format_error_keeps_existing_hint():
    e = snn.ConversionError("x — already has a hint")
    assert format_error(e) == "error: x — already has a hint"


def test_argument_parser_error_is_one_line(capsys):
    p = ArgumentParser(prog="prog")
    p.add_argument("--bit", type=int, choices=(2, 3))
    line = _one_line_error(capsys, lambda: p.parse_args(["--bit", "7"]))
    assert "invalid choice" in line and "prog --help" in line
    _one_line_error(capsys, lambda: p.parse_args(["--nope"]))


def test_unshadow_script_dir(tmp_path, monkeypatch):
    script = tmp_path / "snn.py"
    script.write_text("")
    monkeypatch.setattr(sys, "path", [str(tmp_path), "/somewhere/else"])
    unshadow_script_dir(str(script))
    assert sys.path == ["/somewhere/else"]


def test_plain_args():
    import argparse
    ns = argparse.Namespace(a=1, b="x", c=[1, 2], d=None, e=object(), f=(1.5,))
    out = plain_args(ns)
    assert out["a"] == 1 and out["c"] == [1, 2] and out["d"] is None and isinstance(out["e"], str)
    assert out["f"] == [1.5]


# ------------------------------------------------------------------------------------------ checkpoints
def _net():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def test_atomic_save_roundtrip_and_no_temp_files(tmp_path):
    m = _net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(5, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2, 3])
    state = {"arch": "x", "bit": 2, "wbit": None, "epoch": 3, "best_acc1": 12.5, "state_dict": m.state_dict(),
             "optimizer": opt.state_dict(), "scheduler": ck.plain_scheduler_state(sched), "args": {"lr": 0.1}}
    path = ck.save_checkpoint(state, str(tmp_path / "run"), is_best=True)
    assert sorted(os.listdir(tmp_path / "run")) == [ck.CHECKPOINT, ck.BEST]
    got = ck.load_checkpoint(path)
    assert got["epoch"] == 3 and got["arch"] == "x"
    assert isinstance(got["scheduler"]["milestones"], dict)  # plain types
    sched2 = torch.optim.lr_scheduler.MultiStepLR(torch.optim.SGD(_net().parameters(), lr=0.1), [9])
    ck.load_scheduler_state(sched2, got["scheduler"])
    assert sched2.milestones == collections.Counter({2: 1, 3: 1})
    best = ck.load_checkpoint(str(tmp_path / "run" / ck.BEST))
    assert torch.equal(best["state_dict"]["0.weight"], m.state_dict()["0.weight"])


def test_failed_save_keeps_old_file(tmp_path):
    path = str(tmp_path / "c.pth")
    ck.atomic_save({"state_dict": _net().state_dict()}, path)
    before = open(path, "rb").read()
    with pytest.raises(Exception):
        ck.atomic_save({"bad": lambda: 0}, path)  # lambdas cannot be pickled
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["c.pth"]


def test_raw_state_dict_and_model_key_accepted(tmp_path):
    sd = _net().state_dict()
    torch.save(sd, tmp_path / "raw.pth")
    assert set(ck.load_checkpoint(str(tmp_path / "raw.pth"))["state_dict"]) == set(sd)
    torch.save({"model": sd, "epoch": 1}, tmp_path / "m.pth")
    assert ck.load_checkpoint(str(tmp_path / "m.pth"))["epoch"] == 1


class _Custom:
    pass


@pytest.mark.parametrize("kind, needle", [
    ("missing", "does not exist"), ("folder", "is a folder"), ("corrupt", "corrupt"),
    ("empty", "corrupt"), ("list", "not a model checkpoint"), ("custom", "other than tensors"),
])
def test_bad_checkpoints_are_user_errors(tmp_path, kind, needle):
    path = tmp_path / "c.pth"
    if kind == "folder":
        path.mkdir()
    elif kind == "corrupt":
        path.write_bytes(os.urandom(300))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "custom":
        torch.save({"state_dict": {"w": torch.ones(1)}, "x": _Custom()}, path)
    with pytest.raises(UserError) as e:
        ck.load_checkpoint(str(path), "--init")
    assert needle in str(e.value) and str(e.value).startswith("--init")
    assert "\n" not in format_error(e.value)


# ------------------------------------------------------------------------------------------ metrics
def test_meters():
    m = metrics.AverageMeter("loss")
    m.update(1.0, 2)
    m.update(4.0, 1)
    assert m.avg == pytest.approx(2.0) and m.val == 4.0 and "loss" in str(m)
    metrics.reduce_meters([m])  # one process: unchanged
    assert m.sum == 6.0 and m.count == 3
    c = metrics.CountMeter(2)
    c.update([1, 2], 4)
    c.update([3, 4], 4)
    c.reduce()
    assert c.percent() == [50.0, 75.0]


def test_write_json_atomic_and_jsonable(tmp_path):
    path = str(tmp_path / "sub" / "m.json")
    metrics.write_json(path, {"a": torch.tensor(1.5), "b": torch.arange(3), "c": float("nan"), "d": (1, 2),
                              "e": {1: torch.tensor([True])}})
    d = json.load(open(path))
    env = d.pop("env")  # what the numbers depend on besides the flags
    assert d == {"a": 1.5, "b": [0, 1, 2], "c": None, "d": [1, 2], "e": {"1": True}}
    assert env["threads"] == torch.get_num_threads() and env["torch"] == torch.__version__
    assert {"seed", "python", "torchvision", "host", "platform", "world_size"} <= set(env)
    metrics.write_json(path, {"a": 1}, env=False)
    assert json.load(open(path)) == {"a": 1}
    assert os.listdir(tmp_path / "sub") == ["m.json"]


# ------------------------------------------------------------------------------------------ dist
def test_single_process_context(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with dist.session("cpu") as ctx:
        assert not ctx.distributed and ctx.is_main and ctx.device.type == "cpu"
        assert dist.is_main() and dist.world_size() == 1 and dist.rank() == 0
        assert dist.all_reduce_sum([1, 2.5]) == [1.0, 2.5]
        assert dist.any_rank(True) and not dist.any_rank(False)
        m = torch.nn.Linear(2, 2)
        assert dist.wrap_ddp(m, ctx) is m and dist.unwrap(torch.nn.DataParallel(m)) is m


def test_no_gpu_warns_once(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "_warned", set())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert dist.select_device("3").type == "cpu"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"  # -id sets it, as the original did
    dist.select_device(None)
    err = capsys.readouterr().err
    assert err.count("warning: no GPU found") == 2  # two different messages (one mentions -id)
    dist.select_device(None)
    assert capsys.readouterr().err == ""


def test_local_rank_flag_spellings():
    for flag in ("--local-rank", "--local_rank"):
        p = ArgumentParser()
        dist.add_dist_args(p)
        args = p.parse_args([f"{flag}=1", "-id", "0"])
        assert args.local_rank == 1 and args.device == "0"


def test_device_ids_are_checked_when_parsed(capsys):
    p = ArgumentParser()
    dist.add_dist_args(p)
    assert p.parse_args(["-id", "0,1"]).device == "0,1" and p.parse_args(["-id", "CPU"]).device == "cpu"
    assert p.parse_args(["-id", ""]).device is None       # an empty value: the default device
    for bad in ("abc", "0,x", ","):
        with pytest.raises(SystemExit):
            p.parse_args(["-id", bad])
        assert "is not 'cpu' or GPU ids" in capsys.readouterr().err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from classification.data import ShardSampler
    with dist.session("cpu") as ctx:
        s = dist.all_reduce_sum([rank + 1.0, 1.0])
        m = metrics.AverageMeter("x")
        m.update(float(rank), 2)
        metrics.reduce_meters([m])
        anyr = dist.any_rank(rank == 1)
        idx = list(ShardSampler(5, ctx.rank, ctx.world_size))
        torch.save({"sum": s, "avg": m.avg, "any": anyr, "idx": idx, "main": dist.is_main(),
                    "ws": ctx.world_size}, os.path.join(out, f"r{rank}.pt"))


def test_two_process_gloo_reductions(tmp_path):
    spawn(_ddp_worker, 2, 2, _free_port(), str(tmp_path))
    r = [torch.load(tmp_path / f"r{i}.pt", weights_only=True) for i in range(2)]
    for i in range(2):
        assert r[i]["sum"] == [3.0, 2.0] and r[i]["avg"] == 0.5 and r[i]["any"] is True and r[i]["ws"] == 2
    assert r[0]["main"] and not r[1]["main"]
    assert sorted(r[0]["idx"] + r[1]["idx"]) == list(range(5))  # exact shards, no padding


# ------------------------------------------------------------------------------------------ plots / TB
def _png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots(tmp_path):
    layers = [{"name": f"l{i}", "agreement": 1 - i / 10, "firing_rate": i / 20} for i in range(5)]
    p1 = plots.plot_metric_vs_t({"signed": [50, 60, 70], "unsigned": [40, 50, 55]}, str(tmp_path / "a.png"),
                                {"ANN": 72.0}, ylabel="top-1 accuracy (%)")
    p2 = plots.plot_layers({"signed": layers}, str(tmp_path / "l.png"))
    hist = [{"epoch": e, "train_loss": 2 / e, "test_loss": 2.1 / e, "train_top1": 10 * e, "test_top1": 9 * e,
             "lr": 0.1 / e} for e in range(1, 4)]
    p3 = plots.plot_training(hist, str(tmp_path / "t" / "c.png"))
    m = {"arch": "a", "bit": 2, "T": 3, "neuron": "signed", "per_step_top1": [1, 2, 3], "ann_top1": 3,
         "layers": layers}
    ps = plots.plot_snn_record(m, str(tmp_path / "metrics_snn_signed_T3.json"), key="top1", model="arch",
                               curve=plots.plot_metric_vs_t, suffix="acc_vs_t")
    assert [os.path.basename(p) for p in ps] == ["metrics_snn_signed_T3_acc_vs_t.png",
                                                 "metrics_snn_signed_T3_layers.png"]
    assert all(_png(p) for p in [p1, p2, p3] + ps)


def test_tensorboard_writes_on_main_only(tmp_path):
    with TensorBoard(str(tmp_path / "tb")) as tb:
        tb.scalars(1, "x/", a=1.0, b=None)
        tb.text("t", "hello")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    with TensorBoard(None) as tb:  # disabled: no-op
        tb.scalars(1, a=1.0)


@pytest.mark.parametrize("make", ["folder_over_file", "file_in_file"])
def test_output_path_blocked_by_a_file_is_one_line_error(make, tmp_path, capsys):
    """An output folder where a file stands (``--out``, ``--save_folder``, ``--metrics-out``): one line."""
    blocker = tmp_path / "afile"
    blocker.write_text("x")

    def main(argv):
        os.makedirs(str(blocker) if make == "folder_over_file" else str(blocker / "sub"))
    with pytest.raises(SystemExit) as e:
        run_cli(main, [])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and str(blocker) in err


def test_user_error_from_a_loader_worker_is_its_own_line(tmp_path, capsys):
    """PyTorch re-raises a worker's UserError with the worker's traceback as its text: one line, its own."""
    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise UserError(f"item {i} is broken", "fix it")

    def main(argv):
        next(iter(torch.utils.data.DataLoader(Bad(), num_workers=1)))
    with pytest.raises(SystemExit):
        run_cli(main, [])
    err = capsys.readouterr().err.strip()
    assert err == "error: item 0 is broken — fix it", err


def test_open_rgb_scales_16_bit_grey_images_and_classes_files_take_a_bom(tmp_path):
    """A 16-bit grey PNG keeps its picture (PIL's own conversion clips every value to white); a classes
    file saved with a byte-order mark reads like one without, and a non-UTF-8 one is a one-line error."""
    import numpy as np
    from PIL import Image

    from common import UserError
    from common.loaders import open_rgb
    from detection.data import read_classes as det_classes
    from segmentation.data import read_classes as seg_classes
    g = (np.arange(64 * 48).reshape(48, 64) % 256).astype(np.uint16)
    Image.fromarray(g * 257).save(tmp_path / "g16.png")
    a = np.asarray(open_rgb(str(tmp_path / "g16.png")))
    assert a.shape == (48, 64, 3) and np.array_equal(a[..., 0], g.astype(np.uint8))
    (tmp_path / "bom.txt").write_bytes("\ufeffbackground\ntshirt\ntrouser\n".encode("utf-8"))
    assert det_classes(str(tmp_path / "bom.txt")) == ["tshirt", "trouser"]
    assert seg_classes(str(tmp_path / "bom.txt")) == ["background", "tshirt", "trouser"]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\nshirt\n".encode("latin-1"))
    for read in (det_classes, seg_classes):
        with pytest.raises(UserError, match="not UTF-8"):
            read(str(tmp_path / "latin1.txt"))
