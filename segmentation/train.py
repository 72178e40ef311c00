"""Train (quantized) DeepLab segmenters: deeplabv1_vgg9 / deeplabv3_r34 on VOC 2012, COCO 2017 or a VOC-layout root.

Progressive recipe, from the repository root:

    python segmentation/train.py -d voc --data_root data/VOCdevkit -m deeplabv1_vgg9 --bit 32 --init pretrain/vgg9.pth
    python segmentation/train.py -d voc -m deeplabv1_vgg9 --bit 4 --init weights/voc/deeplabv1_vgg9_32bit/model_best.pth.tar
    python segmentation/train.py --config voc_deeplabv1_3bit          # the original's preset, flags override it
    torchrun --nproc_per_node=4 segmentation/train.py -d coco -m deeplabv3_r34 --bit 32 --init torchvision --sybn

SGD (momentum 0.9, wd 1e-4), poly LR (power 0.9) per iteration, cross-entropy ignoring 255; crops of
--crop_size after random scaling 0.5-2.0 and flips. Writes <save_folder>/<dataset>/<model>_<bit>bit/
{checkpoint.pth.tar, model_best.pth.tar (best val mIoU), history.json, metrics_ann.json, tb/};
--resume auto continues a killed run; a folder that holds a run is not overwritten (--fresh keeps
the old files aside and starts over).
"""
import argparse

from common.cli import ArgumentParser, unshadow_script_dir

unshadow_script_dir(__file__)

from common import run_cli, runs  # noqa: E402
from segmentation import workflow  # noqa: E402


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    workflow.add_common_args(p, bit_default=32, script="train", init_help=(
        "initialise from: a segmentation checkpoint of this model (the bit chain: a higher-bit model_best.pth.tar, "
        "loaded strictly; missing activation clips start at --alpha-init), or a backbone (an ImageNet ResNet-34 "
        "of classification/, a torchvision-named state dict, a VGG; loaded by matching names and shapes), or "
        "'torchvision' (torchvision's ImageNet ResNet-34, online)"))
    p.add_argument("--epochs", type=int, default=50, help="training epochs (default 50)")
    runs.add_optimizer_arg(p)
    runs.add_amp_arg(p)
    p.add_argument("--power", type=float, default=0.9, help="poly LR power (default 0.9)")
    p.add_argument("--eval_epoch", "--eval-epoch", dest="eval_epoch", type=int, default=1,
                   help="evaluate val mIoU every N epochs (and after the last; default 1)")
    p.add_argument("--sybn", action="store_true", help="SyncBatchNorm across the DDP processes")
    p.add_argument("--channels-last", "--channels_last", dest="channels_last", action=argparse.BooleanOptionalAction,
                   default=None, help="train in the channels-last memory layout (default: on the CPU, where VGG-9's "
                                      "training steps run 15-40 %% faster; off on a GPU)")
    p.add_argument("-r", "--resume", default="", metavar="PATH|auto",
                   help="continue a run from its checkpoint ('auto': the run folder's checkpoint.pth.tar, if any)")
    return p


def main(argv=None):
    return workflow.train(workflow.parse_args(get_parser(), argv))


if __name__ == "__main__":
    run_cli(main)
