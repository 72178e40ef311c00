"""Evaluate a segmenter: mIoU of the quantized ANN, or with --spike of its SNN (T = 2^bit - 1) next to the ANN.

    python segmentation/eval.py -d voc -m deeplabv1_vgg9 --bit 2 --init weights/voc/deeplabv1_vgg9_2bit/model_best.pth.tar
    python segmentation/eval.py -d voc -m deeplabv1_vgg9 --bit 2 --spike --plot            # signed IF, T = 3
    python segmentation/eval.py -d voc -m deeplabv1_vgg9 --bit 2 --spike -u                # unsigned IF
    python segmentation/eval.py --config coco_deeplabv3_T7                                 # the original's preset
    torchrun --nproc_per_node=2 segmentation/eval.py -d coco -m deeplabv3_r34 --bit 3 --spike

Images are padded to --test_size (513 VOC / 641 COCO). The confusion matrix is summed over the DDP
processes. With --spike: SNN mIoU, the ANN's mIoU on the same images (ann_miou), mIoU after every time
step t = 1..T from one pass (per_step_miou), per-layer firing rate / agreement, SOPs and energy. The
metrics JSON (--metrics-out, default in the run folder) has miou, ann_miou, per_step_miou,
per_class_iou, pixel_acc, T, neuron, layers, sops; --plot adds mIoU-vs-t and per-layer PNGs.
"""
from common.cli import ArgumentParser, unshadow_script_dir
from common.pipeline import add_snn_args

unshadow_script_dir(__file__)

from common import run_cli  # noqa: E402
from segmentation import workflow  # noqa: E402


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    workflow.add_common_args(p, bit_default=32, script="eval", init_help=(
        "checkpoint to evaluate (default <save_folder>/<dataset>/<model>_<bit>bit/model_best.pth.tar; "
        "snn_ft.py's fine-tuned model too)"))
    p.add_argument("--spike", action="store_true", help="convert to an SNN (T = 2^bit - 1) and evaluate it")
    add_snn_args(p)
    return p


def main(argv=None):
    return workflow.evaluate(workflow.parse_args(get_parser(), argv))


if __name__ == "__main__":
    run_cli(main)
