"""Segment images with a trained ANN or its SNN; write a colour mask (VOC palette PNG) and an overlay PNG each.

    python segmentation/inference.py --input photo.jpg --init weights/voc/deeplabv1_vgg9_2bit/model_best.pth.tar
    python segmentation/inference.py --input images/ --output out/ --spike --bit 2 -m deeplabv1_vgg9

Each image is padded (mean pixel) to the next k * stride + 1 >= max(its side, --test_size), segmented,
cropped back; <output>/<name>_mask.png holds the class indices (palette PNG), <name>_overlay.png the
image with the classes blended in and named (imgviz). The class names come from the checkpoint.
"""
from common.cli import ArgumentParser, unshadow_script_dir
from common.pipeline import add_snn_args

unshadow_script_dir(__file__)

from common import run_cli  # noqa: E402
from segmentation import workflow  # noqa: E402


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    workflow.add_common_args(p, bit_default=32, script="inference", init_help="trained checkpoint (default the run folder's model_best.pth.tar); "
                                                           "--bit and --model default to the checkpoint's")
    p.add_argument("--input", "-i", required=True, metavar="PATH", help="an image file or a folder of images")
    p.add_argument("--output", "-o", default="seg_out", metavar="DIR", help="output folder (default seg_out/)")
    p.add_argument("--spike", action="store_true", help="run the SNN (T = 2^bit - 1) instead of the ANN")
    add_snn_args(p)
    return p


def main(argv=None):
    return workflow.infer(workflow.parse_args(get_parser(), argv))


if __name__ == "__main__":
    run_cli(main)
