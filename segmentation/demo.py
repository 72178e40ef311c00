"""The offline segmentation demo: the whole Fast-SNN segmentation pipeline on the shared scene set, on a CPU.

1. the scene set (``common.scenes``: Fashion-MNIST items on textured canvases, VOC layout) in ``<out>/data``;
2. backbone pretraining (``segmentation/pretrain.py``, the offline stand-in for ImageNet weights): the
   segmenter's own backbone as a classifier of the objects of the training masks (``--pretrain-epochs 0``
   skips it);
3. the progressive 32 -> 4 -> 3 -> 2-bit DeepLab chain (train.py, the 32-bit stage ``--init`` from the
   pretrained backbone, each later stage from the previous one; each stage evaluated once, after its
   last epoch; a narrow net and small crops so it fits the time budget);
4. SNN evaluation (eval.py --spike) of the 4 / 3 / 2-bit ANNs at T = 15 / 7 / 3, signed and unsigned IF;
5. layer-wise fine-tuning (snn_ft.py) of the 2-bit signed SNN, each layer kept only if the SNN's mIoU on a
   few training batches improves, and its evaluation;
6. ``table.md`` / ``summary.json`` (bits | T | ANN mIoU | SNN signed | SNN unsigned | fine-tuned), figures:
   mIoU vs t, per-layer agreement / firing rate, prediction overlays (``overlays.png``, and one
   ``masks_<scene>.png`` per test scene: ANN and SNN side by side) -- all in ``--out``
   (default ``demo_out/segmentation``).

Every step calls a script's ``main(argv)`` (the same code as the command line) and prints the command,
its time and an estimate of the time left. A killed demo continues where it stopped when run again with
the same settings (finished stages are reused; ``--fresh`` starts over).
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Dict, List

from common import run_cli
from common.cli import ArgumentParser
from common.metrics import write_json
from common.stages import (BEST, CHAIN, NEURONS, SNN_T, StageClock, add_chain_args, add_scene_args, chain_figures, chain_rows, chain_table,
                           open_demo, snn_grid, train_chain)

FT_BIT = 2


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description="Fast-SNN segmentation demo on the offline scene set (CPU)")
    add_scene_args(p, out="demo_out/segmentation", train=12000, test=400, max_items=3,
                   train_help="distinct scenes beat epochs: 12000 x 24 epochs score more than 2000 x 96")
    p.add_argument("-m", "--model", default="deeplabv1_vgg9", choices=("deeplabv1_vgg9", "deeplabv3_r34"))
    p.add_argument("--width", type=float, default=0.5,
                   help="channel multiplier (default 0.5: 12 epochs of it score 0.6-1.7 points more at 32 bits and "
                        "1.9-3.3 at 2 bits than 24 of width 0.25, for 1.4 minutes more with --amp)")
    p.add_argument("--size", type=int, default=64, help="scene side in pixels (default 64)")
    p.add_argument("--item-scale", type=float, nargs=2, default=(0.45, 0.8), metavar=("MIN", "MAX"),
                   help="item side as a fraction of the canvas (default 0.45 0.8: fewer background pixels)")
    p.add_argument("--fov-dilation", type=int, default=12,
                   help="dilation of VGG-9's LargeFOV layer (train.py --fov-dilation; default 12, the paper's; on "
                        "64-pixel scenes 1 scored 1.5-2 points more after 24 epochs)")
    p.add_argument("--crop", type=int, default=65, help="training crop (default 65 = 8 * 8 + 1)")
    p.add_argument("--test-size", type=int, default=65, help="test pad size (default 65)")
    p.add_argument("--scales", type=float, nargs="+", default=(0.75, 1.0, 1.25), metavar="S",
                   help="random rescaling of the training scenes (train.py --scales; default 0.75 1 1.25: the "
                        "paper's 0.5-2.0 shrinks a 64-pixel scene's items below 16 pixels or cuts them off)")
    p.add_argument("--pretrain-canvases", type=int, default=0, metavar="N",
                   help="pretrain on N single-item Fashion-MNIST canvases (segmentation/pretrain.py --canvases) "
                        "instead of the objects of the training masks (default 0: the objects)")
    add_chain_args(p, pretrain_epochs=10, pretrain_lr=3e-3, pretrain_size=32, pretrain_what="object crop",
                   epochs_fp=12, epochs_fp_help="default 12", epochs_q=1,
                   optimizer_help="default adam: 47.9 against 41.5 %% mIoU after 24 epochs of 2000 scenes; the quantized stages, "
                                  "short runs from a trained net, use SGD, as good there",
                   lr_fp=None, lr_fp_help="default 3e-3 with adam, 0.1 with sgd", lr_q=0.04,
                   alpha_help="default 3: a short run barely moves the learned clip, and the models' 6 leaves most "
                              "levels unused",
                   ft_batches=8,
                   pretrain_note="; 0 = none, the 32-bit stage starts from random weights")
    p.add_argument("--score-batches", type=int, default=2,
                   help="a tuned layer is kept only if the SNN mIoU on this many training batches improves (default 2)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (tests)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def _predictions(args, common: List[str], runs: str, ft_path: str, n: int = 4):
    """Label maps of the first ``n`` test scenes: ground truth, 2-bit ANN, SNN signed / unsigned, fine-tuned."""
    import numpy as np
    import torch

    from common import pipeline
    from segmentation import data as sd
    from segmentation import eval as seg_eval
    from segmentation import workflow
    a = workflow.parse_args(seg_eval.get_parser(), common + ["--bit", str(FT_BIT)])
    workflow.check_args(a)
    data = sd.build_datasets("voc", a.data_root, crop_size=a.crop_size, test_size=a.test_size, train=False,
                             val_subset=n, check=False)
    dev = torch.device("cpu")
    best = os.path.join(runs, "voc", f"{args.model}_{FT_BIT}bit", "model_best.pth.tar")
    ann, _ = workflow.load_trained(a, data.num_classes, dev, best, "--init", "")
    ann.eval()
    nets = {"ANN 2-bit": ann, "SNN T=3 signed": pipeline.convert(ann), "SNN T=3 unsigned": pipeline.convert(ann, signed=False)}
    if os.path.isfile(ft_path):
        ft, _ = workflow.load_trained(a, data.num_classes, dev, ft_path, "--init", "")
        nets["SNN T=3 fine-tuned"] = pipeline.convert(ft.eval())
    palette = sd.voc_palette()
    panels = []
    for i in range(len(data.val)):
        img, mask = data.val.load(i)
        x, _ = data.val[i]
        h, w = mask.shape
        row = [img, palette[np.where(mask == 255, 0, mask)]]
        with torch.no_grad():
            for net in nets.values():
                label = net(x.unsqueeze(0))[0, :, :h, :w].argmax(0).numpy()
                row.append(workflow.overlay(img, label))
        panels.append(row)
    return panels, ["image", "ground truth"] + list(nets)


def _plan(args) -> Dict[str, float]:
    """Planned seconds of each stage (the time-left estimate; only their ratios matter, the clock rescales
    them by the speed of the stages run so far), scaled by the scene count, the pixels of a crop and the
    width (a net's cost grows as width^2; a bfloat16 step of width 0.5 costs about 0.65 of a float32 one)."""
    net = (args.width / 0.25) ** 2
    amp = 0.65 if args.amp else 1.0
    fit = args.train / 400 * (args.crop / 65) ** 2 * net
    crops = args.pretrain_canvases or 2 * args.train     # about two objects per training scene
    plan = {"pretrain the backbone": 1.07 * args.pretrain_epochs * crops / 800 * (args.pretrain_size / 48) ** 2 * net * amp} \
        if args.pretrain_epochs > 0 else {}
    for bit in CHAIN:
        plan[f"train the {bit}-bit ANN"] = (0.95 * args.epochs_fp * amp if bit == 32 else 1.05 * args.epochs_q) * fit
    for bit, T in SNN_T.items():
        for neuron in NEURONS:
            plan[f"SNN of the {bit}-bit ANN, {neuron} IF"] = 0.25 * T * args.test / 80 * net
    plan[f"fine-tune the {FT_BIT}-bit signed SNN"] = 0.42 * args.ft_batches * net
    return plan


def main(argv=None) -> Dict:
    args = get_parser().parse_args(argv)
    if args.quick:
        args.train, args.test, args.size, args.crop, args.test_size = 24, 8, 48, 33, 49
        args.epochs_fp, args.epochs_q, args.width, args.ft_batches, args.batch_size = 1, 1, 0.125, 1, 8
        args.pretrain_epochs, args.pretrain_size = min(args.pretrain_epochs, 1), 16
    from segmentation.workflow import check_fit, check_scales
    check_fit(args.model, ("--crop", args.crop), ("--test-size", args.test_size))
    check_scales(args.scales)
    out = open_demo(args, ignore=("workers", "progress"))
    runs = os.path.join(out, "runs")
    from common.scenes import make_scenes
    clock = StageClock(_plan(args))
    data_dir = os.path.join(out, "data")
    make_scenes(data_dir, args.train, args.test, args.size, args.seed, max_items=args.max_items,
                scale=tuple(args.item_scale), replace=True)
    from segmentation import eval as seg_eval
    from segmentation import pretrain, snn_ft, train
    common = ["-d", "voc", "--data_root", data_dir, "-m", args.model, "--width", str(args.width), "--crop_size",
              str(args.crop), "--test_size", str(args.test_size), "--save_folder", runs, "-j", str(args.workers),
              "--seed", str(args.seed), "--batch_size", str(args.batch_size), "--test_batch_size", "8",
              "--scales", *(f"{v:g}" for v in args.scales)]
    if args.model == "deeplabv1_vgg9":
        common += ["--fov-dilation", str(args.fov_dilation)]
    if not args.progress:
        common.append("--no-progress")
    pre = None
    if args.pretrain_epochs > 0:
        argv = ["-d", "voc", "--data_root", data_dir, "-m", args.model, "--width", str(args.width), "--save_folder",
                runs, "-j", str(args.workers), "--seed", str(args.seed), "--epochs", str(args.pretrain_epochs),
                "--lr", str(args.pretrain_lr), "--size", str(args.pretrain_size)]
        if args.pretrain_canvases:
            argv += ["--canvases", str(args.pretrain_canvases)]
        if args.amp:
            argv.append("--amp")
        pre = clock.run("pretrain the backbone", "-m segmentation.pretrain", pretrain.main, argv)
    lr_fp = args.lr_fp if args.lr_fp is not None else (3e-3 if args.optimizer == "adam" else 0.1)

    def run_dir(bit):
        return os.path.join(runs, "voc", f"{args.model}_{bit}bit")

    def chain_argv(bit, init):
        fp = bit == 32
        epochs = args.epochs_fp if fp else args.epochs_q
        # one evaluation, after the last epoch: the kept model is the trained one, not the epoch that
        # happened to score best on the test scenes
        argv = common + ["--bit", str(bit), "--epochs", str(epochs), "--eval_epoch", str(epochs),
                         "--lr", str(lr_fp if fp else args.lr_q), "--resume", "auto"]
        argv += (["--optimizer", args.optimizer] + (["--amp"] if args.amp else [])) if fp else \
            ["--alpha-init", str(args.alpha_init)]
        return argv + (["--init", init] if init is not None else [])
    ann = train_chain(clock, run_dir=run_dir, epochs=lambda b: args.epochs_fp if b == 32 else args.epochs_q,
                      argv=chain_argv, script="segmentation/train.py", fn=train.main,
                      stage=lambda b: f"train the {b}-bit ANN", init=pre["checkpoint"] if pre else None)
    snn = snn_grid(clock, path=lambda b, n: os.path.join(out, f"metrics_snn_{b}bit_{n}.json"),
                   argv=lambda b, n, js: common + ["--bit", str(b), "--spike", "--init", os.path.join(run_dir(b), BEST),
                                                   "--metrics-out", js, "--plot"] + (["-u"] if n == "unsigned" else []),
                   script="segmentation/eval.py", fn=seg_eval.main, stage=lambda b, n: f"SNN of the {b}-bit ANN, {n} IF")
    best2 = os.path.join(run_dir(FT_BIT), BEST)
    ft_js = os.path.join(out, f"metrics_snn_ft_{FT_BIT}bit_signed.json")
    ft_path = os.path.join(runs, "voc", f"{args.model}_{FT_BIT}bit_ft", BEST)
    argv = common + ["--bit", str(FT_BIT), "-n", "1", "--max-iters", str(args.ft_batches), "--score-batches",
                     str(args.score_batches), "--init", best2, "--no-eval-before", "--metrics-out", ft_js, "--plot", "--fresh"]
    ft = clock.once(f"fine-tune the {FT_BIT}-bit signed SNN", ft_js, "segmentation/snn_ft.py", snn_ft.main, argv,
                    also=ft_path)
    steps = clock.steps
    t_start = clock.t0

    rows = chain_rows(ann, snn, ft, "miou", FT_BIT)
    for r in rows:                       # the trained ANN's finding vs naming (segmentation.metrics)
        r.update({f"ann_{k}": ann[r["bit"]].get(k) for k in ("item_iou", "naming_acc", "miou_if_named")})
    accepted = [h.get("layer") for h in ft.get("finetune", []) if h.get("accepted")]
    figures = chain_figures(out, rows, snn, ft, key="miou", ylabel="mIoU (%)",
                            title=f"{args.model} (width {args.width}) on the scene set: SNN mIoU vs t")
    figures += _overlays(args, out, common, runs, ft_path)
    md = chain_table(rows, "miou", "mIoU")
    elapsed = time.time() - t_start
    note = (f"{args.model} width {args.width}, "
            + (f"backbone pretrained on the training masks' objects ({args.pretrain_epochs} epochs, held-out accuracy "
               f"{pre['accuracy']:.1f} %), " if pre else "no backbone pretraining, ")
            + f"{args.train} train / {args.test} test scenes of {args.size}x{args.size}, "
            f"crop {args.crop}, test pad {args.test_size}, epochs {args.epochs_fp} (32-bit) + {args.epochs_q} per "
            f"quantized stage, fine-tuning {args.ft_batches} batches per layer (accepted: {len(accepted)} of "
            f"{len(ft.get('finetune', []))} layers); {elapsed / 60:.1f} min"
            + (f". 32-bit ANN: objects found with IoU {ann[32]['item_iou']:.1f} %, {ann[32]['naming_acc']:.1f} % of their "
               f"pixels named right (named all right: mIoU {ann[32]['miou_if_named']:.1f} %)"
               if ann[32].get("naming_acc") is not None else ""))
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(md + "\n\n" + note + "\n")
    summary = {"rows": rows, "note": note, "seconds": elapsed, "steps": steps, "figures": figures,
               "pretrain_accuracy": pre["accuracy"] if pre else None,
               "finetune_accepted": accepted, "args": vars(args)}
    write_json(os.path.join(out, "summary.json"), summary)
    print("\n" + md + "\n\n" + note)
    print(f"results: {os.path.join(out, 'table.md')}, {os.path.join(out, 'summary.json')}; figures: "
          + ", ".join(figures))
    return summary


def _overlays(args, out, common, runs, ft_path) -> List[str]:
    """``overlays.png`` (the first test scenes, one a row) and one ``masks_<i>.png`` a scene: image, ground
    truth, 2-bit ANN and SNNs side by side."""
    from segmentation.plots import plot_overlays
    panels, titles = _predictions(args, common, runs, ft_path)
    figs = [plot_overlays(panels, titles, os.path.join(out, "overlays.png"))]
    for i, row in enumerate(panels):
        figs.append(plot_overlays([row], titles, os.path.join(out, f"masks_{i}.png")))
    return figs


if __name__ == "__main__":
    run_cli(main)
