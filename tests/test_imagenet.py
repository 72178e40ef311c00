"""ImageNet task: loaders (torchvision and DALI CPU), the three scripts in one process and under
torchrun / torch.distributed.launch (gloo), the original README's commands, bad inputs.

Everything runs on a tiny generated ImageFolder (3 classes, 12 train / 6 val JPEGs of 40-100 px).
ResNets run at ``--input-size 64``; AlexNet / VGG have fixed-size classifiers (6x6 / 7x7 feature
maps) and run at 224 with 2 images per batch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from classification import imagenet_data as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "classification", "imagenet")
CLASSES, N_TRAIN, N_VAL = 3, 4, 2

needs_dali = pytest.mark.skipif(not D.dali_available(), reason="NVIDIA DALI is not installed "
                                "(pip install -r requirements-dali.txt); the torchvision loader is tested instead")


def make_image_folder(root: str, classes: int = CLASSES, n_train: int = N_TRAIN, n_val: int = N_VAL,
                      seed: int = 0) -> str:
    """``root/{train,val}/n0000000<c>/img<i>.JPEG``: noisy images whose dominant colour is the class."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            d = os.path.join(root, split, f"n{c:08d}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(40, 100, 2))
                img = np.zeros((h, w, 3), np.float32)
                img[..., c % 3] = 200
                img = np.clip(img + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(d, f"img{i}.JPEG"), quality=90)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("imagenet")))


#: the smaller set for the 224-pixel AlexNet / VGG runs: 2 classes, 2 train / 1 val image each
SMALL = dict(classes=2, n_train=2, n_val=1)


@pytest.fixture(scope="module")
def data_small(tmp_path_factory):
    return make_image_folder(str(tmp_path_factory.mktemp("imagenet_small")), **SMALL)


# ------------------------------------------------------------------------------------------ paths
def test_resolve_data_dirs(data, tmp_path):
    tr, va = D.resolve_data_dirs([data])
    assert tr == os.path.join(data, "train") and va == os.path.join(data, "val")
    assert D.resolve_data_dirs([tr, va]) == (tr, va)
    assert D.resolve_data_dirs(data) == (tr, va)
    with pytest.raises(D.DataError, match="not found"):
        D.resolve_data_dirs([str(tmp_path / "nope")])
    with pytest.raises(D.DataError, match="must hold"):
        D.resolve_data_dirs([str(tmp_path)])
    with pytest.raises(D.DataError, match="too many"):
        D.resolve_data_dirs([tr, va, tr])
    assert D.check_classes(tr, va) == [f"n{c:08d}" for c in range(CLASSES)]
    other = tmp_path / "val"
    (other / "zzz").mkdir(parents=True)
    with pytest.raises(D.DataError, match="differ"):
        D.check_classes(tr, str(other))
    assert D.val_resize(224) == 256


# ---------------------------------------------------------------------------------------- loaders
def _drain(loader):
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return xs, ys


def _check_loaders(data, backend, size=64):
    tr_dir, va_dir = D.resolve_data_dirs([data])
    n_tr, n_va = CLASSES * N_TRAIN, CLASSES * N_VAL
    # one process: every val image once, in folder order; train batches full, shapes right
    train, val = D.build_loaders(tr_dir, va_dir, batch_size=4, workers=1, input_size=size, backend=backend)
    assert train.backend == val.backend == backend
    xs, ys = _drain(val)
    assert torch.cat(ys).tolist() == sorted(c for c in range(CLASSES) for _ in range(N_VAL))
    assert all(x.shape[1:] == (3, size, size) and x.dtype == torch.float32 for x in xs)
    x = torch.cat(xs)
    assert -3 < float(x.mean()) < 3 and float(x.std()) > 0.3  # normalised
    xs, ys = _drain(train)
    assert len(xs) == len(train) == n_tr // 4 and all(x.shape == (4, 3, size, size) for x in xs)
    assert sorted(torch.cat(ys).tolist()) == sorted(c for c in range(CLASSES) for _ in range(N_TRAIN))
    # two ranks: val exact (disjoint, complete), train the same number of full batches per rank
    seen, steps = [], set()
    for rank in range(2):
        tr, va = D.build_loaders(tr_dir, va_dir, batch_size=2, workers=0, input_size=size, backend=backend,
                                 rank=rank, world_size=2)
        seen += torch.cat(_drain(va)[1]).tolist()
        assert va.num_samples == len(torch.cat(_drain(va)[1]))
        steps.add(len(_drain(tr)[0]))
        assert tr.num_samples == 2 * len(tr)
    assert sorted(seen) == sorted(c for c in range(CLASSES) for _ in range(N_VAL)) and len(seen) == n_va
    assert steps == {n_tr // 4}
    return train, val


def test_torch_loader(data):
    _check_loaders(data, "torch")
    tf = D.train_transform(64)
    names = [type(t).__name__ for t in tf.transforms]
    assert names[:3] == ["ToImage", "RandomResizedCrop", "RandomHorizontalFlip"]
    rrc = tf.transforms[1]
    assert tuple(rrc.scale) == (0.1, 1.0) and tuple(rrc.ratio) == (0.8, 1.25)


@needs_dali
def test_dali_cpu_pipeline(data):
    _check_loaders(data, "dali")
    # the same validation tensors as the torchvision loader, up to resampling differences
    va_dir = os.path.join(data, "val")
    a = torch.cat(_drain(D.build_loader(va_dir, train=False, batch_size=6, workers=1, input_size=224,
                                        backend="dali", dali_cpu=True))[0])
    b = torch.cat(_drain(D.build_loader(va_dir, train=False, batch_size=6, workers=0, input_size=224,
                                        backend="torch"))[0])
    assert a.shape == b.shape == (CLASSES * N_VAL, 3, 224, 224)
    assert float((a - b).abs().mean()) < 0.1


def test_loader_choice():
    assert D.choose_backend("torch") == "torch"
    assert D.choose_backend("auto") == ("dali" if D.dali_available() else "torch")
    with pytest.raises(D.DataError):
        D.choose_backend("pil")


@needs_dali
def test_dali_epochs_after_early_break(data):
    """A pass left early (capped fine-tuning) must not shorten the next one."""
    tr_dir, va_dir = D.resolve_data_dirs([data])
    train, val = D.build_loaders(tr_dir, va_dir, batch_size=2, workers=1, input_size=32, backend="dali")
    for loader, n in ((train, CLASSES * N_TRAIN // 2), (val, CLASSES * N_VAL // 2)):
        for _ in loader:
            break
        assert len(_drain(loader)[0]) == n
        assert len(_drain(loader)[0]) == n
    assert torch.cat(_drain(val)[1]).tolist() == sorted(c for c in range(CLASSES) for _ in range(N_VAL))


# ------------------------------------------------------------------------------ schedule and flags
def test_lr_schedule_and_flags():
    from classification.imagenet import task
    assert [task.lr_factor(e) for e in (0, 19, 20, 39, 40, 49, 50, 59)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert task.milestones(60) == [20, 40, 50] and task.milestones(90) == [20, 40, 50, 60, 80]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, task.milestones(90), gamma=0.1)
    for epoch in range(90):
        assert opt.param_groups[0]["lr"] == pytest.approx(task.lr_factor(epoch)), epoch
        opt.step()
        sched.step()
    n = task.normalize_argv
    assert n(["--pretrained", "/data/imagenet"]) == ["--pretrained=torchvision", "/data/imagenet"]
    assert n(["--pretrained", "w.pth", "D"]) == ["--pretrained=w.pth", "D"]
    assert n(["--channels-last", "True", "D"]) == ["--channels-last=True", "D"]
    assert n(["--keep-batchnorm-fp32", "D"]) == ["--keep-batchnorm-fp32=true", "D"]
    p = task.get_parser("train")
    a = p.parse_args(n("-a alexnet -b 256 --bit 4 --workers 4 --lr=0.025 --epochs 60 --dali_cpu --local_rank=3 "
                       "--prof 5 --deterministic --channels-last --keep-batchnorm-fp32 True -t --pretrained "
                       "/data/imagenet2012".split()))
    assert (a.arch, a.batch_size, a.bit, a.workers, a.lr, a.epochs, a.dali_cpu, a.local_rank, a.prof) == \
        ("alexnet", 256, 4, 4, 0.025, 60, True, 3, 5)
    assert a.pretrained == "torchvision" and a.data == ["/data/imagenet2012"] and a.channels_last and a.test
    a = p.parse_args(["--local-rank=1", "--resume", "auto", "--start-epoch", "3", "-e", "--momentum", "0.8",
                      "--wd", "5e-5", "-p", "7", "--loader", "torch", "tr", "va"])
    assert (a.local_rank, a.resume, a.start_epoch, a.evaluate, a.momentum, a.weight_decay, a.print_freq) == \
        (1, "auto", 3, True, 0.8, 5e-5, 7)
    assert a.data == ["tr", "va"] and (a.epochs, a.batch_size, a.bit, a.arch) == (90, 256, 5, "resnet18")
    a = task.get_parser("snn").parse_args("-a alexnet -b 256 -e -u --bit 3 --init x --workers 4 --dali_cpu D".split())
    assert a.unsigned and a.evaluate and a.init == "x"
    a = task.get_parser("ft").parse_args("-a alexnet -b 128 --bit 3 --init x -n 8 --force D".split())
    assert (a.num_epochs, a.force, a.lr) == (8, True, 1e-3)


def test_input_size_rule_matches_the_models():
    """task.check_arch_input_size's arithmetic agrees with the real AlexNet / VGG (run on 'meta')."""
    from classification.imagenet import task
    from classification.models import get_model
    from common import UserError
    for arch in ("alexnet", "vgg16", "vgg11", "resnet18"):
        with torch.device("meta"):
            model = get_model(arch, 2, num_classes=3, dataset="imagenet").eval()
        for size in (64, 192, 193, 222, 223, 224, 254, 255):
            try:
                model(torch.empty(1, 3, size, size, device="meta"))
                runs = True
            except RuntimeError:
                runs = False
            try:
                task.check_arch_input_size(arch, size)
                accepted = True
            except UserError:
                accepted = False
            assert runs == accepted, (arch, size)


SEED_COMMANDS = [  # the original README's ImageNet commands, verbatim after the script name
    ("train", "-a alexnet -b 256 --bit 4 --workers 4 --lr=0.025 --epochs 60 --dali_cpu /data/imagenet2012"),
    ("train", "-a alexnet -b 256 --bit 3 --init result/alexnet_4bit/model_best.pth.tar --workers 4 --lr=0.0025 "
              "--epochs 60 --dali_cpu /data/imagenet2012"),
    ("train", "-a alexnet -b 256 --bit 2 --init result/alexnet_3bit/model_best.pth.tar --workers 4 --lr=0.0025 "
              "--epochs 60 --dali_cpu /data/imagenet2012"),
    ("snn", "-a alexnet -b 256 -e -u --bit 3 --init result/alexnet_3bit/model_best.pth.tar --workers 4 --dali_cpu "
            "/data/imagenet2012"),
    ("snn", "-a alexnet -b 256 -e --bit 2 --init result/alexnet_2bit/model_best.pth.tar --workers 4 --dali_cpu "
            "/data/imagenet2012"),
    ("ft", "-a alexnet -b 128 --bit 3 --init result/alexnet_3bit/model_best.pth.tar --workers 4 --dali_cpu "
           "/data/imagenet2012"),
    ("ft", "-a alexnet -b 128 --bit 2 --init result/alexnet_2bit/model_best.pth.tar --workers 4 --dali_cpu "
           "/data/imagenet2012"),
]


@pytest.mark.parametrize("script,argv", SEED_COMMANDS)
def test_seed_commands_parse(script, argv):
    from classification.imagenet import task
    args = task.parse_args(script, argv.split())
    assert args.arch == "alexnet" and args.dali_cpu and args.workers == 4 and args.data == ["/data/imagenet2012"]


def test_chain_script_dry_run():
    """scripts/imagenet_chain.sh prints commands every parser accepts (4 -> 3 -> 2, SNN -u / signed, ft)."""
    import shlex
    from classification.imagenet import task
    env = dict(os.environ, DRY="1", ARCH="vgg16", FT_FLAGS="--force")
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "imagenet_chain.sh"), "/data/imagenet", "4"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cmds = [shlex.split(line[len("+ "):]) for line in r.stderr.splitlines() if line.startswith("+ ")]
    kinds = {"dali_main.py": "train", "snn.py": "snn", "snn_ft.py": "ft"}
    seen = []
    for c in cmds:
        assert c[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
        script = kinds[os.path.basename(c[5])]
        a = task.parse_args(script, c[6:])
        seen.append((script, a.bit, getattr(a, "unsigned", None)))
        assert a.arch == "vgg16" and a.data == ["/data/imagenet"]
    assert seen == [("train", 32, None), ("train", 4, None), ("train", 3, None), ("train", 2, None),
                    ("snn", 3, True), ("snn", 3, False), ("snn", 2, True), ("snn", 2, False),
                    ("ft", 3, False), ("ft", 2, False)]
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "imagenet_chain.sh")], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


# ---------------------------------------------------------------------------- scripts, in process
@pytest.fixture
def one_thread():
    """One intra-op thread (on 2 shared CPU cores OpenMP's spinning makes small convolutions far
    slower with 2 threads than with 1); global torch flags restored afterwards."""
    n = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)  # and undo what --deterministic switched on for the whole process
    torch.use_deterministic_algorithms(det)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def _size(arch):
    return 64 if arch.startswith("resnet") else 224


METRIC_KEYS = {"arch", "bit", "T", "neuron", "top1", "top5", "ann_top1", "per_step_top1", "layers", "sops",
               "ann_macs", "energy"}


@pytest.mark.parametrize("arch", ["alexnet", "vgg16", "vgg11", "resnet18", "resnet34"])
def test_scripts_one_process(arch, data, data_small, tmp_path, capsys, one_thread):
    """One iteration of train / eval / SNN / fine-tuning per architecture, in this process. ResNets
    at 64 px; AlexNet / VGG (fixed 6x6 / 7x7 classifier inputs) at 224 px on the smaller set."""
    from classification.imagenet import dali_main, snn as snn_script, snn_ft
    out = str(tmp_path / "result")
    small = not arch.startswith("resnet")
    folder, n_val = (data_small, SMALL["classes"] * SMALL["n_val"]) if small else (data, CLASSES * N_VAL)
    loader = "dali" if arch == "resnet34" and D.dali_available() else "torch"
    base = ["-a", arch, "--bit", "2", "-b", "2", "--test-batch-size", "6", "-j", "0", "--input-size",
            str(_size(arch)), "--out", out, "--no-progress", "--loader", loader, folder]
    extra = ["--channels-last", "--deterministic", "-t"] if arch == "resnet18" else ["--epochs", "1"]
    rec = dali_main.main(base + ["--prof", "1", "--lr", "0.01", "--no-tensorboard"] + extra)
    run = os.path.join(out, "imagenet", f"{arch}_2bit")  # ImageNet runs: <out>/imagenet/
    assert os.path.isfile(os.path.join(run, "checkpoint.pth.tar"))
    assert os.path.isfile(os.path.join(run, "model_best.pth.tar"))
    assert rec["arch"] == arch and rec["epochs"] == 1
    rec = dali_main.main(base + ["-e", "--init", os.path.join(run, "model_best.pth.tar")])
    assert rec["samples"] == n_val
    assert " * Acc@1 " in capsys.readouterr().out
    for unsigned in ([], ["-u"]) if arch == "alexnet" else ([],):
        rec = snn_script.main(base + ["-e"] + unsigned)
        assert METRIC_KEYS <= set(rec) and rec["T"] == 3 and len(rec["per_step_top1"]) == 3
        assert rec["neuron"] == ("unsigned" if unsigned else "signed") and rec["samples"] == n_val
        with open(os.path.join(run, f"metrics_snn_{rec['neuron']}_T3.json")) as f:
            assert METRIC_KEYS <= set(json.load(f))
        assert rec["layers"][0]["agreement"] == 1.0  # the first spiking layer is exact
    rec = snn_ft.main(base + ["--force", "--prof", "1", "--no-eval-before", "--no-tensorboard"])
    ft = os.path.join(out, "imagenet", f"{arch}_2bit_ft", "model_best.pth.tar")
    assert os.path.isfile(ft) and rec["finetuned"] and METRIC_KEYS <= set(rec)
    assert all(h["accepted"] for h in rec["finetune"]) and len(rec["finetune"]) >= 1
    if arch == "alexnet":  # snn.py takes the fine-tuned model back
        rec = snn_script.main(base + ["--init", ft])
        assert rec["finetuned"]
    assert " * Acc@1 " in capsys.readouterr().out


def test_pretrained_local_file(data, tmp_path, capsys, one_thread):
    import torchvision
    from classification.imagenet import dali_main
    from classification.models import get_model
    import quant
    path = str(tmp_path / "resnet18_tv.pth")
    tv = torchvision.models.resnet18(num_classes=CLASSES)
    torch.save(tv.state_dict(), path)
    argv = ["-a", "resnet18", "--bit", "4", "-b", "2", "-j", "0", "--input-size", "64", "--out", str(tmp_path),
            "--no-progress", "--no-tensorboard", "--loader", "torch", data]
    rec = dali_main.main(argv + ["-e", "--pretrained", path])
    assert "--pretrained: weights from" in capsys.readouterr().out
    # the same accuracy as the torchvision weights loaded by hand
    from classification.engine import evaluate
    model = get_model("resnet18", 4, num_classes=CLASSES, dataset="imagenet")
    quant.load_init(model, tv.state_dict())
    val = D.build_loader(os.path.join(data, "val"), train=False, batch_size=6, workers=0, input_size=64,
                         backend="torch")
    assert evaluate(model, val, print_result=False)["top1"] == pytest.approx(rec["top1"])
    dali_main.main(argv + ["--pretrained", path, "--epochs", "1", "--prof", "1"])
    assert os.path.isfile(tmp_path / "imagenet" / "resnet18_4bit" / "model_best.pth.tar")


# ------------------------------------------------------------------------------------- bad inputs
def _user_error(main, argv, capsys):
    from common import run_cli
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    err = [l for l in err if not l.startswith("warning:")]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def test_bad_inputs(data, tmp_path, capsys, one_thread):
    from classification.imagenet import dali_main, snn as snn_script, snn_ft
    from classification.models import get_model
    ok = ["-b", "2", "-j", "0", "--input-size", "64", "--out", str(tmp_path), "--no-progress", "--loader", "torch"]
    msg = _user_error(dali_main.main, ["-a", "resnet18", "--bit", "2"] + ok + [str(tmp_path / "no")], capsys)
    assert "not found" in msg and " — " in msg  # every error says what to do
    assert "must hold" in _user_error(dali_main.main, ["--bit", "2"] + ok + [str(tmp_path)], capsys)
    assert "arch" in _user_error(dali_main.main, ["-a", "resnet5"] + ok + [data], capsys)
    assert "--bit" in _user_error(dali_main.main, ["--bit", "7"] + ok + [data], capsys)
    assert "required" in _user_error(dali_main.main, ["--bit", "2"] + ok, capsys)
    missing = str(tmp_path / "missing.pth")
    assert "does not exist" in _user_error(dali_main.main, ["--bit", "2", "--init", missing] + ok + [data], capsys)
    assert "does not exist" in _user_error(snn_script.main, ["--bit", "2", "-e"] + ok + [data], capsys)
    for name, payload in (("junk.pth", b"junk\n"), ("rand.pth", os.urandom(3000))):
        bad = tmp_path / name
        bad.write_bytes(payload)
        msg = _user_error(dali_main.main, ["--bit", "2", "--init", str(bad)] + ok + [data], capsys)
        assert "corrupt" in msg and " — re-create it" in msg and ("a text file" in msg) == (name == "junk.pth")
    other = tmp_path / "resnet34.pth"
    torch.save({"state_dict": get_model("resnet34", 2, num_classes=CLASSES, dataset="imagenet").state_dict()}, other)
    msg = _user_error(snn_script.main, ["-a", "resnet18", "--bit", "2", "-e", "--init", str(other)] + ok + [data], capsys)
    assert "does not fit" in msg and "does not match" in msg
    msg = _user_error(snn_ft.main, ["-a", "resnet34", "--bit", "32", "-u", "--init", str(other)] + ok + [data], capsys)
    assert "32" in msg
    assert "--input-size" in _user_error(dali_main.main, ["-a", "vgg16", "--bit", "2"] + ok + [data], capsys)
    assert "torchvision" in _user_error(dali_main.main, ["-a", "alexnet", "--bit", "2", "--pretrained", "-b", "2",
                                                         "--input-size", "224", data], capsys)
    assert "batch" in _user_error(dali_main.main, ["--bit", "2"] + ok + ["-b", "1", data], capsys)
    (tmp_path / "val" / "zzz").mkdir(parents=True)
    assert "differ" in _user_error(dali_main.main, ["--bit", "2"] + ok + [
        os.path.join(data, "train"), str(tmp_path / "val")], capsys)


# ---------------------------------------------------------------------------- several processes
def _launch(launcher, script, argv, cwd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", launcher, "--nproc_per_node=2"]
    if launcher == "torch.distributed.run":
        cmd.append("--standalone")
    else:
        cmd.append(f"--master_port={_free_port()}")
    r = subprocess.run(cmd + [os.path.join(SCRIPTS, script)] + argv, cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    return r


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(data, tmp_path):
    """Train + SNN under torchrun --nproc_per_node=2 (gloo): one set of outputs, exact reduced metrics."""
    argv = ["-a", "resnet18", "--bit", "2", "-b", "2", "-j", "1", "--input-size", "64", "--out", "result",
            "--no-progress", "--epochs", "1", "--prof", "2", "--loader", "torch", data]
    r = _launch("torch.distributed.run", "dali_main.py", argv, str(tmp_path))
    assert r.stdout.count(" * Acc@1 ") == 1 and "2 process(es)" in r.stdout
    run = tmp_path / "result" / "imagenet" / "resnet18_2bit"
    assert (run / "model_best.pth.tar").is_file() and (run / "checkpoint.pth.tar").is_file()
    assert not list((tmp_path / "result").glob("**/*.tmp"))
    ann = json.loads((run / "history.json").read_text())["history"]
    assert len(ann) == 1
    loader = "dali" if D.dali_available() else "torch"
    i = argv.index("--epochs")
    snn_argv = (argv[:i] + argv[i + 2:])[:-3]  # snn.py has no --epochs
    r = _launch("torch.distributed.run", "snn.py", snn_argv + ["--loader", loader, "--dali_cpu", "-e", data],
                str(tmp_path))
    assert r.stdout.count(" * Acc@1 ") == 1
    rec = json.loads((run / "metrics_snn_signed_T3.json").read_text())
    assert rec["samples"] == CLASSES * N_VAL  # every validation image once over the two ranks
    assert METRIC_KEYS <= set(rec)


def test_seed_readme_commands_distributed_launch(data_small, tmp_path):
    """The README's ImageNet commands as written (python -m torch.distributed.launch, run from a
    working directory with result/ below it), with -b 2, one epoch, one pass of fine-tuning per epoch,
    2 processes, the tiny data."""
    def seed(script, args):
        return _launch("torch.distributed.launch", script, args.split() + [data_small], str(tmp_path))
    seed("dali_main.py", "-a alexnet -b 2 --bit 4 --workers 4 --lr=0.025 --epochs 1 --dali_cpu")
    seed("dali_main.py", "-a alexnet -b 2 --bit 3 --init result/alexnet_4bit/model_best.pth.tar --workers 4 "
                         "--lr=0.0025 --epochs 1 --dali_cpu")
    r = seed("snn.py", "-a alexnet -b 2 -e -u --bit 3 --init result/alexnet_3bit/model_best.pth.tar --workers 4 "
                       "--dali_cpu")
    assert "T=7, unsigned" in r.stdout and r.stdout.count(" * Acc@1 ") == 1
    # --min-steps 0: one pass per epoch over the tiny data (the default floor would cycle its few batches
    # to 50 steps per layer, minutes of CPU for a test of the command line)
    r = seed("snn_ft.py", "-a alexnet -b 2 --bit 3 --init result/alexnet_3bit/model_best.pth.tar --workers 4 "
                          "--dali_cpu --min-steps 0")
    # the original's result/alexnet_<bit>bit paths name this project's result/imagenet/alexnet_<bit>bit
    assert "using result/imagenet/alexnet_3bit/model_best.pth.tar" in r.stdout
    assert (tmp_path / "result" / "imagenet" / "alexnet_3bit_ft" / "model_best.pth.tar").is_file()
    assert (tmp_path / "result" / "imagenet" / "alexnet_3bit_ft" / "metrics_snn_ft_signed_T7.json").is_file()
