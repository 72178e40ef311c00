"""The chain scripts share one rule (scripts/lib/chain.sh): DRY=1 prints every command and runs nothing;
an evaluation or fine-tuning whose output exists is skipped; training stages always resume."""
from __future__ import annotations

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# script, its arguments, env, the number of commands, outputs that mark steps as done; "{tmp}" is the test's
# folder (the chains run from the repository root, so their output roots are given as absolute paths)
CHAINS = {
    "cifar10": (["alex"], {"OUT": "{tmp}/res"}, 9,
                ["res/alex_3bit/metrics_snn_signed_T7.json", "res/alex_2bit/metrics_snn_unsigned_T3.json",
                 "res/alex_2bit_ft/model_best.pth.tar"]),
    "detection": (["yolov2_tiny"], {"OUT": "{tmp}/w"}, 12,
                  ["w/voc/yolov2_tiny_4bit/metrics_snn_signed_T15.json",
                   "w/voc/yolov2_tiny_2bit/metrics_snn_unsigned_T3.json",
                   "w/voc/yolov2_tiny_3bit_ft/model_best.pth.tar"]),
    "segmentation": (["deeplabv1_vgg9"], {"SAVE": "{tmp}/w"}, 11,
                     ["w/voc/deeplabv1_vgg9_3bit/metrics_snn_signed_T7.json",
                      "w/voc/deeplabv1_vgg9_4bit/metrics_snn_unsigned_T15.json",
                      "w/voc/deeplabv1_vgg9_2bit_ft/model_best.pth.tar"]),
    "imagenet": (["{tmp}", "1"], {"OUT": "{tmp}/res", "ARCH": "vgg16"}, 10,
                 ["res/imagenet/vgg16_3bit/metrics_snn_unsigned_T7.json",
                  "res/imagenet/vgg16_2bit/metrics_snn_signed_T3.json",
                  "res/imagenet/vgg16_2bit_ft/model_best.pth.tar"]),
}


def _run(name, tmp_path, extra=(), check=True, **env):
    args, base_env, _, _ = CHAINS[name]
    args = [a.format(tmp=tmp_path) for a in args] + list(extra)
    log = tmp_path / "calls"
    stub = tmp_path / "py"
    stub.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\n")
    stub.chmod(0o755)
    full = {k: v for k, v in os.environ.items() if k != "DRY"}
    full.update(PYTHON=str(stub), PY=str(stub), EPOCHS="1", **{k: v.format(tmp=tmp_path) for k, v in base_env.items()},
                **env)
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", f"{name}_chain.sh"), *args], cwd=tmp_path,
                       capture_output=True, text=True, env=full, timeout=60)
    if not check:
        return r, [], []
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    printed = [line for line in r.stderr.splitlines() if line.startswith("+ ")]
    return r, calls, printed


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_dry_run_prints_everything_and_runs_nothing(name, tmp_path):
    r, calls, printed = _run(name, tmp_path, DRY="1")
    assert calls == [], "DRY=1 ran a command"
    assert len(printed) == CHAINS[name][2], r.stderr
    assert all(p.startswith("+ python ") for p in printed)
    assert sorted(os.listdir(tmp_path)) == ["py"], "DRY=1 created files"
    assert not any(os.path.exists(os.path.join(ROOT, d)) for d in ("res", "w")), "outputs went to the repository"
    assert "chain done" not in r.stderr and "done:" not in r.stderr


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_finished_steps_are_skipped(name, tmp_path):
    _, calls, printed = _run(name, tmp_path)
    n = CHAINS[name][2]
    assert len(calls) == n and len(printed) == n
    done = CHAINS[name][3]
    for rel in done:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    (tmp_path / "calls").unlink()
    r, calls, printed = _run(name, tmp_path)
    assert len(calls) == n - len(done), calls
    for rel in done:
        assert f"skip (done): {tmp_path / rel}" in r.stderr
        assert not any(str(tmp_path / rel) in c for c in calls)
    assert any("--resume auto" in c for c in calls), "training stages must still run (and resume)"
    # a dry run of the finished chain says the same
    (tmp_path / "calls").unlink()
    r, calls, printed = _run(name, tmp_path, DRY="1")
    assert calls == [] and len(printed) == n - len(done) and r.stderr.count("skip (done): ") == len(done)


@pytest.mark.parametrize("name,var,default", [("detection", "TRAIN_FLAGS", "-ms --ema --sybn"),
                                              ("segmentation", "FT_ARGS", "--force")])
def test_an_empty_flags_variable_means_no_flags(name, var, default, tmp_path):
    _, _, printed = _run(name, tmp_path, DRY="1")
    assert any(default in p for p in printed)
    _, _, printed = _run(name, tmp_path, DRY="1", **{var: ""})
    assert not any(default.split()[0] in p.split() for p in printed), printed
    if name == "detection":               # FT_BITS="" : no fine-tuning step
        _, _, printed = _run(name, tmp_path, DRY="1", FT_BITS="")
        assert len(printed) == CHAINS[name][2] - 2 and not any("snn_ft" in p for p in printed)


@pytest.mark.parametrize("how", [["-d", "coco"], ["--dataset=coco"], ["-dcoco"], "env"])
def test_detection_dataset_reaches_every_step_and_folder(how, tmp_path):
    extra, env = (["-root", "R"], {"DATASET": "coco"}) if how == "env" else (["-root", "R", *how], {})
    _, _, printed = _run("detection", tmp_path, extra, DRY="1", PRETRAIN="1", **env)
    assert len(printed) == CHAINS["detection"][2] + 1 and "detection.pretrain" in printed[0]
    for p in printed:
        words = p.split()
        assert words.count("-d") == 1 and "--dataset=coco" not in words and "-dcoco" not in words, p
        assert words[words.index("-d") + 1] == ("coco-val" if "eval.py" in p else "coco"), p
        assert f"{tmp_path}/w/voc" not in p, p
    assert f"--init {tmp_path}/w/coco/yolov2_tiny_pretrain/model_best.pth.tar" in printed[1]
    r, _, _ = _run("detection", tmp_path, ["-d", "imagenet"], check=False, DRY="1")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "detection_chain.sh: unknown dataset 'imagenet' -- use -d voc or -d coco (or DATASET=voc / coco)"]


@pytest.mark.parametrize("name", ["detection", "segmentation"])
@pytest.mark.parametrize("workers", [["-j", "0"], ["-j0"], ["--workers", "0"], ["--workers=0"]])
def test_pretraining_gets_the_workers_flag_in_every_form(name, workers, tmp_path):
    _, _, printed = _run(name, tmp_path, ["-x", "1", *workers], DRY="1", PRETRAIN="1")
    assert "pretrain" in printed[0] and printed[0].endswith(" ".join(workers)), printed[0]
    assert " -x " not in printed[0]
    assert all(p.endswith(" ".join(["-x", "1", *workers])) for p in printed[1:])


@pytest.mark.parametrize("how", [["-d", "coco"], ["--dataset=coco"], ["-dcoco"]])
def test_segmentation_run_folders_follow_the_dataset_in_any_form(how, tmp_path):
    _, _, printed = _run("segmentation", tmp_path, how, DRY="1", PRETRAIN="1")
    assert all(f"{tmp_path}/w/voc" not in p for p in printed)
    assert f"--init {tmp_path}/w/coco/deeplabv1_vgg9_pretrain/model_best.pth.tar" in printed[1]
    assert all(p.endswith(" ".join(how)) for p in printed)
