"""Train a quantized YOLOv2 detector: VOC 07+12 trainval or COCO train2017.

Run from this folder (as the original) or anywhere:

    python -m torch.distributed.launch --nproc_per_node=4 train.py -d voc -v yolov2_tiny -ms --ema --sybn --batch_size 4 --bit 32
    python -m torch.distributed.launch --nproc_per_node=4 train.py -d voc -v yolov2_tiny -ms --ema --sybn --batch_size 4 --bit 4 --init weights/voc/yolov2_tiny_32bit/model_best.pth.tar
    torchrun --nproc_per_node=4 train.py -d coco -v yolov2_r34 -ms --ema --bit 32 --init resnet34_imagenet.pth
    python train.py -d voc -root data/scenes --classes data/scenes/classes.txt --width 0.25 --train_size 160 --val_size 160 --epochs 30

Writes <save_folder>/<dataset>/<version>_<bit>bit/{checkpoint.pth.tar, model_best.pth.tar (best mAP),
history.json, metrics_ann.json}; --resume auto continues a killed run; a folder that holds a run is
not overwritten (--fresh keeps the old files aside and starts over).
"""
from common.cli import ArgumentParser, unshadow_script_dir

unshadow_script_dir(__file__)

from common import run_cli, runs  # noqa: E402
from detection import workflow as W  # noqa: E402


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    W.add_model_args(p, bit_default=32, train=True)
    W.add_data_args(p, W.DATASETS_TRAIN, "voc")
    W.add_runtime_args(p, train=True)
    p.add_argument("-bs", "--batch_size", "--batch-size", dest="batch_size", type=int, default=16,
                   help="batch size per process (default 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="initial learning rate (default 1e-3)")
    runs.add_optimizer_arg(p)
    runs.add_amp_arg(p)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight_decay", "--weight-decay", dest="weight_decay", type=float, default=5e-4)
    p.add_argument("--epochs", type=int, default=250, help="epochs (default 250; LR x0.1 at 60 %% and 80 %%)")
    p.add_argument("--start_epoch", "--start-epoch", dest="start_epoch", type=int, default=0)
    p.add_argument("--wp_epoch", "--wp-epoch", dest="wp_epoch", type=int, default=2,
                   help="warm-up epochs, lr = base * (iter / warm-up iters)^4 (default 2)")
    p.add_argument("--no_warmup", "--no-warmup", dest="no_warmup", action="store_true", help="no warm-up")
    p.add_argument("--eval_epoch", "--eval-epoch", dest="eval_epoch", type=int, default=10,
                   help="evaluate (and keep the best) every N epochs and after the last (default 10)")
    p.add_argument("-r", "--resume", default="", metavar="PATH|auto",
                   help="continue a run ('auto': <save_folder>/<dataset>/<version>_<bit>bit/checkpoint.pth.tar)")
    p.add_argument("-ms", "--multi_scale", "--multi-scale", dest="multi_scale", action="store_true",
                   help="multi-scale training: a random size in 0.5-0.95 x train_size (320-608 for 640) every 10 iterations")
    p.add_argument("--iters-per-epoch", "--iters_per_epoch", dest="iters_per_epoch", type=int, default=None, metavar="N",
                   help="training batches per epoch and process (default: the whole training set); the loader "
                        "reshuffles every epoch, so each epoch draws another N batches")
    p.add_argument("--ema", action="store_true", help="keep an exponential moving average of the weights (evaluated and saved)")
    p.add_argument("--sybn", action="store_true", help="SyncBatchNorm across processes (GPUs)")
    p.add_argument("--mosaic", action="store_true", help="accepted for compatibility; unused (as in the original)")
    p.add_argument("--vis", action="store_true", help="accepted for compatibility; use demo.py to draw boxes")
    p.add_argument("--dist_url", "--dist-url", dest="dist_url", default="env://",
                   help="accepted for compatibility; the launcher's environment (env://) is used")
    p.add_argument("--train_size", "--train-size", dest="train_size", type=int, default=640,
                   help="training input size (default 640)")
    p.add_argument("--val_size", "--val-size", dest="val_size", type=int, default=416,
                   help="evaluation input size (default 416)")
    p.add_argument("--anchors", default="", metavar="SPEC",
                   help="anchors in grid cells: voc, coco, auto[:K] (k-means of the training boxes at train_size) "
                        "or 'w,h w,h ...' (default: the dataset's; with --init: the checkpoint's)")
    p.add_argument("--aug", default="ssd", choices=("ssd", "flip", "none"),
                   help="training augmentation: ssd = photometric distortion, zoom-out, IoU crop, flip (the "
                        "original's; default), flip = horizontal flip only, none")
    p.add_argument("--alpha-init", "--alpha_init", dest="alpha_init", type=float, default=None,
                   help="initial activation clip of the quantizers (default 6.0)")
    p.add_argument("--teacher", default="", metavar="PATH",
                   help="knowledge distillation: a trained detector of the same version, classes and anchors (any "
                        "bits, e.g. the chain's 32-bit model); the student also learns its class distribution and "
                        "box outputs, weighted by its objectness (default: none)")
    p.add_argument("--kd-weight", "--kd_weight", dest="kd_weight", type=float, default=1.0,
                   help="weight of the distillation loss against the detection loss (default 1.0)")
    W.add_post_args(p)
    return p


def main(argv=None):
    return W.train(get_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
