"""Fine-tuning fidelity over regimes beyond the demo: ResNet-20 2-bit (and the detection demo's YOLOv2-tiny)
at T = 3, several methods, several seeds.

Every cell (regime, seed, method) is one run of :mod:`classification.fidelity` (its trained ANN chain is
cached, so a re-run only redoes the fine-tuning; a cell whose JSON exists is not re-run). Regimes:

* ``demo``  -- the demo's: 8,000 Fashion-MNIST training images, the ANN fine-tuned on the same set,
  63 batches of 128 per layer, accept / revert score on 8 training batches;
* ``demo_small`` -- the demo's ANN, fine-tuned on 600 of its images in batches of 100 (6 batches);
* ``small`` -- an ANN trained on 2,000 of those images (the demo's recipe), fine-tuned on 600 images in
  batches of 100 (6 batches: every score and every accept test sees only training images);
* ``crops`` -- another dataset: 32 x 32 object crops of the offline scene set (:mod:`common.scenes`:
  Fashion-MNIST items tinted in colour on textured backgrounds, partly occluded), 2,000 training and
  500 test crops, its own chain (the demo's recipe), 16 batches of 128 per layer, 4 score batches;
* ``crops_small`` -- the crops' ANN fine-tuned on 600 crops in batches of 100;
* ``yolo`` -- the detection demo's 2-bit YOLOv2-tiny at T = 3 (its chain: :mod:`detection.offline_demo`,
  run in ``<out>/detection_c<seed>``), each cell one ``detection/snn_ft.py`` with the demo's fine-tuning
  flags (``default``: that script's default, ``e2e``: ``--method fastsnn+e2e``), the settle check one
  ``detection/eval.py --spike --settle K``; the score is mAP@0.5 on the demo's test scenes.

Each regime also checks the settle mode (K = 9, the demo's): exact when the SNN's top-1 equals the ANN's
within 0.1 point and every layer agrees with the ANN's levels on >= 99.9 % of its neurons. The table
(mean +- spread over the seeds, spread = half the range) goes to ``<results>.json`` and ``<results>.md``
with the command that made it.

    python benchmarks/fidelity_regimes.py                                  # every regime and method, seeds 0 1
    python benchmarks/fidelity_regimes.py --regimes small --seeds 0 --methods force,default   # some cells
    python benchmarks/fidelity_regimes.py --table-only                     # the table of the cells run so far
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import run_cli  # noqa: E402
from common.cli import ArgumentParser  # noqa: E402
from common.metrics import write_json  # noqa: E402
from common.stages import SNN_T  # noqa: E402

CROPS = "crops"  # the object-crop folder dataset, under --out
REGIMES: Dict[str, dict] = {
    "demo": {"text": "the demo's: 8,000 Fashion-MNIST images, fine-tuned on the same (63 batches of 128)",
             "argv": []},
    "demo_small": {"text": "the demo's ANN (8,000 images) fine-tuned on 600 of its images in batches of 100 (6 batches)",
                   "argv": ["--ft-subset", "600", "--ft-batch-size", "100"]},
    "small": {"text": "a 2,000-image Fashion-MNIST ANN fine-tuned on 600 images in batches of 100 (6 batches)",
              "argv": ["--train-subset", "2000", "--ft-subset", "600", "--ft-batch-size", "100"]},
    "crops": {"text": "scene-set object crops (colour, texture, occlusion): 2,000 training / 500 test images "
                      "(12 epochs at 32 bits), fine-tuned on the same (16 batches of 128; 4 score batches)",
              "argv": ["--dataset", "folder", "--train-subset", "2000", "--val-subset", "500", "--epochs-fp", "12",
                       "--score-batches", "4"]},
    "crops_small": {"text": "the crops' ANN fine-tuned on 600 crops in batches of 100 (6 batches)",
                    "argv": ["--dataset", "folder", "--train-subset", "2000", "--val-subset", "500", "--epochs-fp", "12",
                             "--ft-subset", "600", "--ft-batch-size", "100"]},
    "yolo": {"text": "the detection demo's 2-bit YOLOv2-tiny (width 0.5, 96 px scenes, its own chain), fine-tuned as "
                     "the demo does (6 batches of 16 per layer, 4 score batches); mAP@0.5 on the 96 test scenes",
             "task": "detection", "argv": []},
}
DETECTION = "detection_c{seed}"  # the detection demo's run folder of one chain seed, under --out
# label -> detection/snn_ft.py flags (labels without an entry are not run on the detection regime);
# "default" is snn_ft.py's own default there
DET_METHODS: Dict[str, List[str]] = {
    "force": ["--method", "fastsnn", "--force"],
    "default": [],
    "e2e": ["--method", "fastsnn+e2e"],
}
# label -> classification.fidelity method spec; "score=fixed": N training batches drawn once (snn_ft.py's test)
_DEFAULT = "fastsnn+e2e:e2e_loss=ce,e2e_epochs=3,accept=local,score=fixed"
METHODS: Dict[str, str] = {
    "force": "fastsnn:score=none",                      # --method fastsnn --force, the original algorithm
    "original": "fastsnn:score=fixed",                  # --method fastsnn, its accept / revert test
    "local": _DEFAULT,                                   # fastsnn+e2e, local test, one pass per epoch
    "default": _DEFAULT + ",min_steps=50",              # the default: at least 50 steps per epoch
    "default_kl": _DEFAULT.replace("e2e_loss=ce", "e2e_loss=kl") + ",min_steps=50",
    "default_steps100": _DEFAULT + ",min_steps=100",
    "e2e": None,                                         # detection only (DET_METHODS)
}
METHOD_TEXT = {
    "force": "`--method fastsnn --force` (the original, every layer kept)",
    "original": "`--method fastsnn` (the original, whole-SNN score test)",
    "local": "`fastsnn+e2e`, local test, one pass per epoch (the previous default)",
    "default": "**the default** (classification: `fastsnn+e2e`, local test, >= 50 steps per epoch; "
               "detection: its `snn_ft.py` default)",
    "default_kl": "as the default, end-to-end loss KL to the ANN's logits",
    "default_steps100": "as the default, >= 100 steps per epoch",
    "e2e": "`--method fastsnn+e2e` (classification's default; detection only)",
}
SETTLE_K = 9


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description="Fine-tuning fidelity of ResNet-20 2-bit (T = 3) over several regimes "
                                   "(demo, a small fine-tuning set, another dataset, the detection demo's "
                                   "YOLOv2-tiny), several seeds")
    p.add_argument("--out", default="demo_out/fidelity_regimes",
                   help="run folder: cached ANN chains, the crops, one JSON per cell (default demo_out/fidelity_regimes)")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default <out>/data)")
    p.add_argument("--regimes", default=",".join(REGIMES), help=f"comma-separated (default all: {','.join(REGIMES)})")
    p.add_argument("--methods", default="force,local,default",
                   help=f"comma-separated labels of {', '.join(METHODS)} (default force,local,default)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--chain-seed", type=int, default=None,
                   help="train one ANN chain with this seed and vary only the fine-tuning's seed (default: one chain "
                        "per seed)")
    p.add_argument("-a", "--arch", default="resnet20")
    p.add_argument("--results", default="benchmarks/results/fidelity_regimes",
                   help="table path without extension (.json and .md written; default benchmarks/results/fidelity_regimes)")
    p.add_argument("--table-only", action="store_true", help="only build the table from the cells already run")
    p.add_argument("--settle", action=argparse.BooleanOptionalAction, default=True,
                   help="run the settle check of each chain (default on; with --chain-seed under that seed only)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (tests): small sets, one epoch per stage")
    return p


def _list(text: str, known, flag: str) -> List[str]:
    from common import UserError
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in known]
    if bad:
        raise UserError(f"{flag} {','.join(bad)}: unknown", f"choose from {', '.join(known)}")
    return items


def object_crops(root: str, n_train: int, n_test: int, seed: int = 0, size: int = 64) -> str:
    """An image-folder dataset (``root/{train,val}/<class>/<i>.png``, 32 x 32 RGB) of the objects of scenes
    drawn by :func:`common.scenes.render_scene` (training items from Fashion-MNIST's training split, test
    items from its test split): a square around each item's visible box, resized. Deterministic in
    ``seed``; written once (a ``done.json`` stamp with the parameters), to a temporary folder renamed at
    the end."""
    import shutil
    import numpy as np
    from PIL import Image
    from common.scenes import CLASSES, load_fashion_mnist, render_scene
    params = {"n_train": n_train, "n_test": n_test, "seed": seed, "size": size, "version": 1}
    stamp = os.path.join(root, "done.json")
    if os.path.isfile(stamp):
        with open(stamp) as f:
            if json.load(f) == params:
                return root
        raise SystemExit(f"{root} holds crops of other parameters: delete it or choose another --out")
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for split, sub, n in (("train", "train", n_train), ("test", "val", n_test)):
        images, labels = load_fashion_mnist(split)
        for c in CLASSES:
            os.makedirs(os.path.join(tmp, sub, c), exist_ok=True)
        count, i = 0, 0
        while count < n:
            scene = render_scene(np.random.default_rng([seed, 0 if split == "train" else 1, i]), images, labels, size)
            i += 1
            for (x0, y0, x1, y1), label in zip(scene.boxes, scene.labels):
                side = min(size, max(x1 - x0, y1 - y0) + 5)
                cx, cy = (x0 + x1 + 1) // 2, (y0 + y1 + 1) // 2
                left = min(max(0, cx - side // 2), size - side)
                top = min(max(0, cy - side // 2), size - side)
                crop = Image.fromarray(scene.image[top:top + side, left:left + side]).resize((32, 32), Image.BILINEAR)
                crop.save(os.path.join(tmp, sub, CLASSES[label], f"{count:05d}.png"))
                count += 1
                if count == n:
                    break
    with open(os.path.join(tmp, "done.json"), "w") as f:
        json.dump(params, f)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return root


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", label)


def _tag(args, regime: str, seed: int, label: str) -> str:
    chain = "" if args.chain_seed is None else f"_c{args.chain_seed}"
    return f"_{regime}{chain}_s{seed}_{_slug(label)}"


def cell_path(args, regime: str, seed: int, label: str) -> str:
    arch = "yolov2_tiny" if _is_detection(regime) else args.arch
    return os.path.join(args.out, f"fidelity_{arch}{_tag(args, regime, seed, label)}.json")


def run_cell(args, regime: str, seed: int, label: Optional[str]) -> dict:
    """One run of classification.fidelity: the method ``label`` (``None``: the settle check) on ``regime``."""
    from classification import fidelity
    argv = ["--out", args.out, "--data", args.data, "-a", args.arch,
            "--seed", str(seed if args.chain_seed is None else args.chain_seed), "--ft-seed", str(seed),
            "--tag", _tag(args, regime, seed, label or "settle")] + REGIMES[regime]["argv"]
    if "--dataset" in argv:  # the crops
        argv[argv.index("--data") + 1] = os.path.join(args.out, CROPS)
    if args.quick:
        argv.append("--quick")
    if label is None:
        argv += ["--methods", "", "--settle-k", str(SETTLE_K), "--no-figure"]
    else:
        argv += ["--methods", METHODS[label] + ";", "--no-settle"]
    print("python -m classification.fidelity " + " ".join(shlex.quote(a) for a in argv), flush=True)
    return fidelity.main(argv)


def _is_detection(regime: str) -> bool:
    return REGIMES[regime].get("task") == "detection"


def _applies(regime: str, label: Optional[str]) -> bool:
    """Whether the method ``label`` (``None``: the settle check) is run on ``regime``."""
    if label is None:
        return True
    if _is_detection(regime):
        return label in DET_METHODS
    return METHODS[label] is not None


#: the detection chains of the recorded cells: the demo with 2560 scenes and a 16000-canvas x 6-epoch
#: pretraining, a 32-bit stage of 6 epochs (one of warm-up), no distillation, every quantized stage at lr 1e-4,
#: evaluated on 96 test scenes
#: (a weaker ANN than the demo's default, which trains on 18000 scenes and tests on 480)
DETECTION_RECIPE = ("--train", "2560", "--test", "96", "--size", "96", "--pretrain", "16000", "--pretrain-epochs", "6",
                    "--pretrain-size", "64", "--epochs-fp", "6", "--warmup-fp", "1", "--distill-bits", "",
                    "--lr-2bit", "1e-4")


def detection_chain(args, seed: int) -> dict:
    """The detection demo (``detection.offline_demo``, seed ``seed``) in ``<out>/detection_c<seed>``: its
    2-bit checkpoint, scene root, classes, input size and the SNN before fine-tuning. A finished or
    killed demo there is continued, not redone."""
    from common.metrics import read_json
    from detection import offline_demo
    out = os.path.join(args.out, DETECTION.format(seed=seed))
    argv = ["--out", out, "--seed", str(seed), "--workers", "1"] + list(DETECTION_RECIPE)
    if args.quick:
        argv += ["--train", "8", "--test", "4", "--size", "64", "--width", "0.125", "--pretrain", "32",
                 "--pretrain-epochs", "1", "--pretrain-size", "32", "--epochs-fp", "1", "--epochs-q", "1",
                 "--batch-size", "4", "--ft-iters", "1"]
    if not os.path.isfile(os.path.join(out, "summary.json")):
        print("python -m detection.offline_demo " + " ".join(shlex.quote(a) for a in argv), flush=True)
        offline_demo.main(argv)
    bit, T = offline_demo.FT_BIT, SNN_T[offline_demo.FT_BIT]
    demo = read_json(os.path.join(out, "demo_args.json"))
    scenes = os.path.join(out, "data", "scenes")
    return {"out": out, "checkpoint": os.path.join(out, "weights", "voc", f"yolov2_tiny_{bit}bit", "model_best.pth.tar"),
            "data": ["-d", "voc", "-root", scenes, "--classes", os.path.join(scenes, "classes.txt"), "-size",
                     str(demo["size"]), "-bs", "16", "--num_workers", "1", "--no-progress", "--bit", str(bit)],
            "ft": ["-n", "1", "--max-iters", str(demo["ft_batches"]), "--score-batches", "4", "--aug", "flip",
                   "--no-eval-before", "--no-tfboard", "--fresh"],
            "snn": read_json(os.path.join(out, "metrics", f"snn_{bit}bit_signed_T{T}.json"))}


def run_detection_cell(args, regime: str, seed: int, label: Optional[str]) -> dict:
    """One cell of the detection regime: ``detection/snn_ft.py`` with the flags of ``label`` (fine-tuning
    seed ``seed``) on the demo's 2-bit detector, or (``label=None``) ``eval.py --spike --settle K``. The
    cell has the classification cells' keys (``ann_top1`` etc. hold mAP@0.5)."""
    from detection import eval as eval_script
    from detection import snn_ft
    chain = detection_chain(args, seed if args.chain_seed is None else args.chain_seed)
    tag = _tag(args, regime, seed, label or "settle").lstrip("_")
    folder = os.path.join(args.out, "detection_runs", tag)
    metrics = os.path.join(folder, "metrics.json")
    before = chain["snn"]
    cell = {"task": "detection", "metric": "mAP@0.5", "arch": "yolov2_tiny", "bit": 2, "T": before["T"],
            "seed": args.chain_seed if args.chain_seed is not None else seed, "ft_seed": seed,
            "checkpoint": chain["checkpoint"], "snn_top1": before["map"]}
    if label is None:
        argv = chain["data"] + ["--init", chain["checkpoint"], "--spike", "--settle", str(SETTLE_K), "--metrics-out", metrics]
        print("python detection/eval.py " + " ".join(shlex.quote(a) for a in argv), flush=True)
        rec = eval_script.main(argv)
        agreement = [la["agreement"] for la in rec.get("layers") or [] if la.get("agreement") is not None]
        cell.update(ann_top1=rec["ann_map"], settle={"K": SETTLE_K, "sweep": [
            {"K": SETTLE_K, "top1": rec["map"], "ann_top1": rec["ann_map"],
             "min_agreement": min(agreement) if agreement else None}]})
    else:
        argv = chain["data"] + ["--init", chain["checkpoint"], "--save_folder", folder, "--seed", str(seed),
                                "--metrics-out", metrics] + chain["ft"] + DET_METHODS[label]
        print("python detection/snn_ft.py " + " ".join(shlex.quote(a) for a in argv), flush=True)
        rec = snn_ft.main(argv)
        hist = rec.get("finetune") or []
        cell.update(ann_top1=rec["ann_map"], methods=[{
            "method": " ".join(DET_METHODS[label]) or "default", "top1": rec["map"], "ann_top1": rec["ann_map"],
            "seconds": rec["finetune_seconds"], "per_step_top1": rec.get("per_step_map"),
            "accepted": f"{sum(bool(h.get('accepted')) for h in hist)}/{len(hist)}"}])
    cell["argv"] = argv
    write_json(cell_path(args, regime, seed, label or "settle"), cell)
    return cell


def _mean_spread(values: List[float]):
    m = sum(values) / len(values)
    return m, (max(values) - min(values)) / 2


def table(args, regimes: List[str], labels: List[str], seeds: List[int]) -> dict:
    """The cells on disk -> rows (regime, method): per-seed top-1, mean, spread, gap to the ANN."""
    rows, settle = [], {}
    for regime in regimes:
        anns: Dict[int, float] = {}
        for label in [None] + labels:
            per = {}
            for seed in seeds:
                path = cell_path(args, regime, seed, label or "settle")
                if not os.path.isfile(path):
                    continue
                with open(path) as f:
                    res = json.load(f)
                anns[seed] = res["ann_top1"]
                if label is None:
                    sw = res["settle"]["sweep"][-1]
                    exact = res["settle"]["K"] == SETTLE_K  # classification: the sweep stops once exact
                    if res.get("task") == "detection":  # one evaluation at K: equal mAP, every layer agreeing
                        exact = abs(sw["top1"] - sw["ann_top1"]) <= 0.1 and (sw["min_agreement"] or 0) >= 0.999
                    per[seed] = {"top1": sw["top1"], "ann_top1": sw["ann_top1"], "min_agreement": sw["min_agreement"],
                                 "exact": exact, "snn_top1": res["snn_top1"]}
                elif res.get("methods"):
                    m = res["methods"][0]
                    per[seed] = {"top1": m["top1"], "accepted": m["accepted"], "seconds": m["seconds"]}
            if label is None:
                settle[regime] = per
                continue
            if not per:
                continue
            mean, spread = _mean_spread([v["top1"] for v in per.values()])
            ann_mean = sum(anns[s] for s in per) / len(per)
            spec = " ".join(DET_METHODS[label]) if _is_detection(regime) else METHODS[label]
            rows.append({"regime": regime, "method": label, "spec": spec, "seeds": sorted(per),
                         "top1": {str(s): v["top1"] for s, v in per.items()}, "mean": round(mean, 2),
                         "spread": round(spread, 2), "ann_mean": round(ann_mean, 2), "gap": round(ann_mean - mean, 2),
                         "accepted": {str(s): v["accepted"] for s, v in per.items()},
                         "seconds": {str(s): v["seconds"] for s, v in per.items()}})
    return {"rows": rows, "settle": settle}


def markdown(res: dict, command: str) -> str:
    lines = [f"- `{r}`: {text}" for r, text in res["regimes"].items()] + [""]
    lines += ["| regime | method | top-1 (detection: mAP@0.5) at T = 3, mean ± spread | per seed | ANN | gap to ANN "
              "| layers kept |",
             "|---|---|---:|---|---:|---:|---|"]
    for r in res["rows"]:
        per = " / ".join(f"{r['top1'][str(s)]:.1f}" for s in r["seeds"])
        kept = " / ".join(str(r["accepted"][str(s)]) for s in r["seeds"])
        lines.append(f"| {r['regime']} | {METHOD_TEXT.get(r['method'], r['method'])} | {r['mean']:.1f} ± "
                     f"{r['spread']:.1f} | {per} | {r['ann_mean']:.1f} | {r['gap']:.1f} | {kept} |")
    lines += ["", f"Settle mode (K = {SETTLE_K}):", "", "| regime | seed | ANN | SNN at T = 3 | settle top-1 | "
              "min layer agreement | exact |", "|---|---:|---:|---:|---:|---:|---|"]
    for regime, per in res["settle"].items():
        for s, v in sorted(per.items()):
            lines.append(f"| {regime} | {s} | {v['ann_top1']:.1f} | {v['snn_top1']:.1f} | {v['top1']:.1f} | "
                         f"{'–' if v['min_agreement'] is None else format(v['min_agreement'], '.4f')} | "
                         f"{'yes' if v['exact'] else 'no'} |")
    return "\n".join(lines + ["", f"Command: `{command}`", ""])


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    regimes = _list(args.regimes, REGIMES, "--regimes")
    labels = _list(args.methods, METHODS, "--methods")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.data = args.data or os.path.join(args.out, "data")
    if not args.table_only:
        if any("--dataset" in REGIMES[r]["argv"] for r in regimes):
            object_crops(os.path.join(args.out, CROPS), *((64, 32) if args.quick else (2000, 500)))
        for regime in regimes:
            for seed in seeds:
                settle = [None] if args.settle and args.chain_seed in (None, seed) else []  # one per chain
                for label in settle + labels:
                    path = cell_path(args, regime, seed, label or "settle")
                    if os.path.isfile(path) or not _applies(regime, label):
                        continue
                    if _is_detection(regime):
                        run_detection_cell(args, regime, seed, label)
                    else:
                        run_cell(args, regime, seed, label)
    res = table(args, regimes, labels, seeds)
    # the command that runs every cell of this table (cells already on disk are reused)
    command = "python benchmarks/fidelity_regimes.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv) if a != "--table-only")
    res.update(arch=args.arch, bit=2, T=3, regimes={r: REGIMES[r]["text"] for r in regimes},
               methods={m: METHODS[m] for m in labels}, command=command, threads=_threads())
    write_json(args.results + ".json", res)
    with open(args.results + ".md", "w") as f:
        f.write(markdown(res, command))
    print(markdown(res, command))
    return res


def _threads() -> int:
    import torch
    return torch.get_num_threads()


if __name__ == "__main__":
    run_cli(main)
