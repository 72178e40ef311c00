"""Draw the detections of a trained YOLOv2 (ANN, or with --spike its SNN) on an image or a folder.

    python demo.py --init weights/voc/yolov2_tiny_32bit/model_best.pth.tar --path photo.jpg
    python demo.py --init CHECKPOINT_PATH --bit 3 --spike --path data/scenes/VOCdevkit/VOC2007/JPEGImages --out det_png

Writes one PNG per image into --out (boxes, class names and scores above --vis_thresh); a file that does
not decode is skipped with a warning. --input / --output are the same as --path / --out.
"""
from common.cli import ArgumentParser, unshadow_script_dir

unshadow_script_dir(__file__)

from common import run_cli  # noqa: E402
from detection import workflow as W  # noqa: E402


def get_parser() -> ArgumentParser:
    from common import dist
    from common.pipeline import add_snn_args
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    W.add_model_args(p, bit_default=32)
    dist.add_dist_args(p)
    p.add_argument("--path", "--input", dest="path", required=True, help="an image file or a folder of images")
    p.add_argument("--out", "--output", dest="out", default="det_results", help="output folder (default det_results/)")
    p.add_argument("-d", "--dataset", default="voc", choices=W.DATASETS_EVAL,
                   help="dataset the default --init path refers to (default voc)")
    p.add_argument("--classes", default="", metavar="FILE", help="class names (default: those in the checkpoint)")
    W.add_size_arg(p)
    p.add_argument("--vis_thresh", "--vis-thresh", dest="vis_thresh", type=float, default=0.3,
                   help="draw boxes scoring at least this (default 0.3)")
    p.add_argument("--spike", action="store_true", help="run the converted SNN (T = 2^bit - 1)")
    p.add_argument("--cuda", action="store_true", help="use the GPU (default when there is one)")
    p.add_argument("--save_folder", "--save-folder", dest="save_folder", default="weights/",
                   help="where the default --init is looked for (DIR/<dataset>/<version>_<bit>bit/model_best.pth.tar)")
    add_snn_args(p)
    W.add_post_args(p)
    return p


def main(argv=None):
    return W.demo(get_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
