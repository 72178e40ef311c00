"""The offline detection demo: the whole Fast-SNN detection pipeline on the Fashion-MNIST scene set, on a CPU.

1. the scene set (``common.scenes``: 18000 training / 480 test scenes of 1-2 tinted Fashion-MNIST items on
   textured 128 x 128 canvases, VOC layout) in ``<out>/data/scenes``;
2. backbone pretraining (``detection/pretrain.py``, the offline stand-in for the paper's ImageNet
   backbone): the detector's own conv stack as a Fashion-MNIST classifier on single-item 96 x 96
   canvases drawn from Fashion-MNIST's training images, their items the size of the scenes' (58-96 px;
   ``--pretrain 0`` skips it);
3. a progressive 32 -> 4 -> 3 -> 2-bit ``yolov2_tiny`` chain (``train.py``, the 32-bit stage ``--init``
   from the pretrained backbone, each later stage from the previous best; ``--width 0.5``, input 128 =
   a 4 x 4 grid, anchors by k-means of the training boxes; the 32-bit stage 4 epochs over every scene,
   each quantized stage 2 epochs of 12000 scenes drawn afresh; the 2-bit stage, the furthest from its
   start, at 6 x the 4 / 3-bit stages' learning rate, and also learning from the 32-bit ANN by
   distillation, ``--teacher``);
4. SNN evaluation (``eval.py --spike``) of the 4 / 3 / 2-bit detectors at T = 15 / 7 / 3, signed and
   unsigned IF neurons (mAP after every step, per-layer statistics);
5. layer-wise fine-tuning (``snn_ft.py``) of the 2-bit signed SNN, evaluated again;
6. ``<out>/results.md`` (table ``bits | T | ANN mAP | SNN signed | SNN unsigned | fine-tuned``),
   ``summary.json``, ``map_vs_t.png``, ``layers.png`` and boxes drawn by the 2-bit ANN / fine-tuned SNN
   on test images (``boxes_ann/``, ``boxes_snn/``, and side by side in ``boxes_<image>.png``).

Every step calls the scripts' ``main(argv)`` (the same code as the command line) and prints the
equivalent command, its time and an estimate of the time left; a killed demo continues where it
stopped when run again with the same settings. One run is one seed (``--seed``); a few epochs of
training on a CPU amplify float rounding, so another machine or thread count gives somewhat different
numbers.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Dict, List

from common import UserError, run_cli
from common.cli import ArgumentParser
from common.metrics import read_json, write_json
from common.stages import (BEST, CHAIN, NEURONS, SNN_T, StageClock, add_chain_args, add_scene_args, chain_figures, chain_rows,
                           chain_table, open_demo, snn_grid, train_chain)

FT_BIT = 2


def get_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m detection.offline_demo", description=__doc__.split("\n\n")[0])
    add_scene_args(p, out="demo_out/detection", train=18000, test=480, max_items=2,
                   train_help="more distinct scenes beat more epochs here")
    p.add_argument("--train-q", type=int, default=12000, metavar="N",
                   help="training scenes a quantized stage sees per epoch, drawn afresh from --train each epoch "
                        "(default 12000; train.py --iters-per-epoch N / --batch-size)")
    p.add_argument("--size", type=int, default=128,
                   help="canvas / input size (default 128: a 4 x 4 grid at stride 32; 96, a 3 x 3 grid, takes about 0.85 x the time and names fewer items right)")
    p.add_argument("--width", type=float, default=0.5, help="yolov2_tiny channel multiplier (default 0.5)")
    p.add_argument("--scale", type=float, nargs=2, default=(0.45, 0.75), help="item size / canvas (default 0.45 0.75)")
    p.add_argument("--pretrain", type=int, default=32000,
                   help="single-item canvases of the backbone pretraining (default 32000; 0 = no pretraining, "
                        "the 32-bit stage starts from random weights)")
    p.add_argument("--warmup-fp", type=int, default=0, metavar="N",
                   help="warm-up epochs of the 32-bit stage (train.py --wp_epoch; default 0: the pretrained backbone and "
                        "Adam need none here)")
    p.add_argument("--distill-bits", default="2", metavar="BITS",
                   help="quantized stages that also learn from the 32-bit ANN (train.py --teacher; comma list of 4, "
                        "3, 2; default 2; '' none)")
    p.add_argument("--lr-2bit", type=float, default=6e-4, metavar="LR",
                   help="learning rate of the 2-bit stage (default 6e-4: its activations move furthest from the 3-bit "
                        "start; --lr-q sets the 4 / 3-bit stages')")
    add_chain_args(p, pretrain_epochs=12, pretrain_lr=1e-2, pretrain_size=None, pretrain_what="canvas",
                   pretrain_size_help="default: the scenes' largest item, --size x the larger --scale, to a multiple "
                                      "of 32, so that the canvases' items (0.6-1.0 x the side) are the scenes' size: "
                                      "96 at the default 128 px, 64 at --size 96", epochs_fp=4,
                   epochs_fp_help="default 4, without warm-up", epochs_q=2,
                   optimizer_help="default adam: reaches a usable detector in the few hundred steps a CPU affords; sgd, "
                                  "the original's, needs far more epochs",
                   lr_fp=2e-3, lr_fp_help="default 2e-3", lr_q=1e-4, lr_q_what="the 4 / 3-bit stages",
                   alpha_help="default 3.0, about the 99th percentile of the float net's activations here; the usual "
                              "6.0 wastes half the levels at this scale",
                   ft_batches=6, amp=False)
    return p


def pretrain_size(size: int, scale) -> int:
    """The pretraining canvas side whose items (0.6-1.0 x the side) match the scenes' largest ones
    (``size`` x the larger ``scale``), to a multiple of the stride 32: measured, canvases at the items' size
    name the scenes' items better than smaller ones (docs/detection.md)."""
    return max(32, 32 * round(size * max(scale) / 32))


def distill_bits(spec: str) -> List[int]:
    """``--distill-bits``: a comma list of quantized stages (4, 3, 2), or empty."""
    try:
        bits = [int(b) for b in spec.replace(",", " ").split()]
    except ValueError:
        bits = None
    if bits is None or any(b not in CHAIN[1:] for b in bits):
        raise UserError(f"--distill-bits {spec!r} is not a comma list of the quantized stages {', '.join(map(str, CHAIN[1:]))}",
                        "pass e.g. --distill-bits 2, or '' for none")
    return bits


def _plan(args) -> Dict[str, float]:
    """Planned seconds of each stage (the time-left estimate; only their ratios matter, the clock rescales
    them by the speed of the stages run so far), scaled by the scene / canvas counts, epochs, pixels and width."""
    per_scene = (args.size / 96) ** 2 * (args.width / 0.5) ** 2
    # 96-pixel canvases cost about 1.45 x the 64-pixel ones (2.25 x the pixels): hence the 0.9 power
    plan = {"pretrain backbone": 0.00055 * args.pretrain * args.pretrain_epochs * (args.pretrain_size / 64) ** 0.9
            * (args.width / 0.5) ** 2} if args.pretrain > 0 else {}
    for bit in CHAIN:
        plan[f"train {bit}-bit"] = (0.0049 * per_scene * (args.epochs_fp * args.train if bit == 32
                                                           else args.epochs_q * min(args.train, args.train_q))
                                    * (1.4 if bit in args.distill_bits else 1.0))  # + the teacher's forward
    for bit, T in SNN_T.items():
        for neuron in NEURONS:
            plan[f"SNN {bit}-bit {neuron} T={T}"] = 0.0014 * per_scene * args.test * T
    plan[f"fine-tune {FT_BIT}-bit SNN"] = 0.5 * args.ft_batches
    return plan


def side_by_side(left: str, right: str, dst: str):
    """Two drawings next to each other, 8 white pixels apart."""
    from PIL import Image
    with Image.open(left) as a, Image.open(right) as b:
        a, b = a.convert("RGB"), b.convert("RGB")
        canvas = Image.new("RGB", (a.width + 8 + b.width, max(a.height, b.height)), "white")
        canvas.paste(a, (0, 0))
        canvas.paste(b, (a.width + 8, 0))
        canvas.save(dst)


def main(argv=None):
    args = get_parser().parse_args(argv)
    args.distill_bits = distill_bits(args.distill_bits)
    from detection.workflow import check_size
    check_size("--size", args.size)
    if args.pretrain_size is None:
        args.pretrain_size = pretrain_size(args.size, args.scale)
    check_size("--pretrain-size", args.pretrain_size if args.pretrain > 0 else None)
    from common import scenes
    from detection import demo as demo_script
    from detection import eval as eval_script
    from detection import pretrain as pretrain_script
    from detection import snn_ft as ft_script
    from detection import train as train_script
    out = os.path.abspath(open_demo(args, ignore=("workers",)))
    steps = StageClock(_plan(args))
    sc = scenes.make_scenes(os.path.join(out, "data", "scenes"), args.train, args.test, args.size, args.seed,
                            max_items=args.max_items, scale=tuple(args.scale), replace=True)
    weights = os.path.join(out, "weights")
    data = ["-d", "voc", "-v", "yolov2_tiny", "-root", sc.root, "--classes", sc.classes,
            "--num_workers", str(args.workers), "--no-progress"]
    pre = None
    bb_path = os.path.join(weights, "voc", f"yolov2_tiny_backbone_w{args.width:g}.pth.tar")
    if args.pretrain > 0:
        argv_p = ["--out", bb_path, "--width", str(args.width), "--size", str(args.pretrain_size), "--train",
                  str(args.pretrain), "--epochs", str(args.pretrain_epochs), "--lr", str(args.pretrain_lr),
                  "--seed", str(args.seed)] + (["--amp"] if args.amp else [])
        done_p = bb_path + ".json"
        if os.path.isfile(done_p) and os.path.isfile(bb_path) and read_json(done_p).get("argv") == argv_p:
            steps.skip("pretrain backbone", bb_path)
            pre = read_json(done_p)
        else:
            pre = steps.run("pretrain backbone", "-m detection.pretrain", pretrain_script.main, argv_p)
            pre = {"accuracy": pre["accuracy"], "history": pre["history"], "argv": argv_p}
            write_json(done_p, pre)

    def run_dir(bit):
        return os.path.join(weights, "voc", f"yolov2_tiny_{bit}bit")

    def chain_argv(bit, init):
        fp = bit == 32
        epochs = args.epochs_fp if fp else args.epochs_q
        argv = data + ["--bit", str(bit), "--width", str(args.width), "--train_size", str(args.size),
                       "--val_size", str(args.size), "--epochs", str(epochs), "--eval_epoch", str(epochs),
                       "-bs", str(args.batch_size), "--lr", str(args.lr_fp if fp else args.lr_2bit if bit == 2 else args.lr_q),
                       "--wp_epoch", str(args.warmup_fp if fp else 0), "--aug", "flip", "--optimizer", args.optimizer,
                       "--weight_decay", "0" if args.optimizer == "adam" else "5e-4", "--save_folder", weights,
                       "--seed", str(args.seed), "--resume", "auto", "--no-tfboard"]
        if fp:
            return argv + ["--anchors", "auto"] + (["--amp"] if args.amp else []) + (["--init", init] if init else [])
        cap = ["--iters-per-epoch", str(max(1, args.train_q // args.batch_size))] if args.train_q < args.train else []
        return argv + cap + ["--init", init, "--alpha-init", str(args.alpha_init)] + (
            ["--teacher", os.path.join(run_dir(32), BEST)] if bit in args.distill_bits else [])
    ann = train_chain(steps, run_dir=run_dir, epochs=lambda b: args.epochs_fp if b == 32 else args.epochs_q,
                      argv=chain_argv, script="detection/train.py", fn=train_script.main,
                      stage=lambda b: f"train {b}-bit", init=bb_path if args.pretrain > 0 else None)
    ev = data + ["-size", str(args.size), "-bs", "16"]
    snn = snn_grid(steps, path=lambda b, n: os.path.join(out, "metrics", f"snn_{b}bit_{n}_T{SNN_T[b]}.json"),
                   argv=lambda b, n, js: ev + ["--bit", str(b), "--spike", "--init", os.path.join(run_dir(b), BEST),
                                               "--metrics-out", js] + (["-u"] if n == "unsigned" else []),
                   script="detection/eval.py", fn=eval_script.main, stage=lambda b, n: f"SNN {b}-bit {n} T={SNN_T[b]}")
    best = {b: os.path.join(run_dir(b), BEST) for b in CHAIN}
    ft_path = os.path.join(run_dir(FT_BIT) + "_ft", BEST)
    ft_json = os.path.join(out, "metrics", f"snn_ft_{FT_BIT}bit_signed.json")
    ft_rec = steps.once(f"fine-tune {FT_BIT}-bit SNN", ft_json, "detection/snn_ft.py", ft_script.main,
                        ev + ["--bit", str(FT_BIT), "--init", best[FT_BIT], "-n", "1", "--max-iters", str(args.ft_batches),
                              "--score-batches", "4", "--aug", "flip", "--save_folder", weights, "--seed", str(args.seed),
                              "--no-eval-before", "--no-tfboard", "--fresh", "--metrics-out", ft_json], also=ft_path)
    imgs = os.path.join(out, "data", "demo_images")
    os.makedirs(imgs, exist_ok=True)
    for i in sc.test_ids[:4]:
        shutil.copyfile(os.path.join(sc.voc2007, "JPEGImages", f"{i}.jpg"), os.path.join(imgs, f"{i}.jpg"))
    common_demo = ["--path", imgs, "-size", str(args.size), "--vis_thresh", "0.2", "--bit", str(FT_BIT)]
    steps.run("boxes (2-bit ANN)", "detection/demo.py", demo_script.main,
              common_demo + ["--init", best[FT_BIT], "--out", os.path.join(out, "boxes_ann")])
    steps.run("boxes (2-bit fine-tuned SNN)", "detection/demo.py", demo_script.main,
              common_demo + ["--init", ft_path, "--spike", "--out", os.path.join(out, "boxes_snn")])
    for i in sc.test_ids[:4]:
        side_by_side(os.path.join(out, "boxes_ann", f"{i}.png"), os.path.join(out, "boxes_snn", f"{i}.png"),
                     os.path.join(out, f"boxes_{i}.png"))
    summary = report(out, args, ann, snn, ft_rec, time.time() - steps.t0, pre)
    print(f"\n{summary['table']}\nresults -> {os.path.join(out, 'results.md')}, summary.json, map_vs_t.png, layers.png "
          f"({summary['minutes']:.1f} min)")
    return summary


def report(out: str, args, ann, snn, ft_rec, seconds: float, pre=None) -> dict:
    rows = chain_rows(ann, snn, ft_rec, "map", FT_BIT)
    table = chain_table(rows, "map", "mAP")
    figures = chain_figures(out, rows, snn, ft_rec, key="map", ylabel="mAP@0.5 (%)",
                            title="yolov2_tiny on the scene set: SNN mAP@0.5 vs t")
    summary = {"table": table, "rows": rows, "minutes": seconds / 60, "args": vars(args),
               "ann_map": {b: ann[b]["map"] for b in ann},
               "ann_map_agnostic": {b: ann[b].get("map_agnostic") for b in ann},
               "ann_naming_acc": {b: ann[b].get("naming_acc") for b in ann},
               "snn": {f"{b}bit_{n}": {k: r[k] for k in ("map", "ann_map", "per_step_map", "T", "neuron", "sops", "energy")}
                       for (b, n), r in snn.items()},
               "finetuned": {k: ft_rec[k] for k in ("map", "ann_map", "per_step_map", "T", "neuron")},
               "ann_refs": {f"ANN {r['bit']}-bit": r["ann_map"] for r in rows[1:]}, "figures": figures,
               "pretrain_accuracy": pre["accuracy"] if pre else None}
    write_json(os.path.join(out, "summary.json"), summary)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# Detection demo (yolov2_tiny, width {args.width}, {args.size}x{args.size}, {args.train} train / "
                f"{args.test} test scenes, seed {args.seed})\n\nmAP@0.5 (VOC07 11-point, %) on the test scenes; "
                f"{seconds / 60:.1f} min. "
                + (f"Backbone pretrained as a Fashion-MNIST classifier ({args.pretrain} canvases of {args.pretrain_size} px x "
                   f"{args.pretrain_epochs} epochs, held-out accuracy {pre['accuracy']:.1f} %)." if pre else
                   "No backbone pretraining.")
                + (f" The 32-bit ANN finds the objects with a class-agnostic AP50 of {ann[32]['map_agnostic']:.1f} % and "
                   f"names {ann[32]['naming_acc']:.1f} % of those it finds right." if ann[32].get("naming_acc") is not None
                   else "")
                + f"\n\n{table}\n")
    return summary


if __name__ == "__main__":
    run_cli(main)
