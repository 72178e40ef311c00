"""Evaluate a quantized YOLOv2 detector, or with --spike its converted SNN.

    python eval.py -d voc --cuda -v yolov2_tiny --bit 4 --spike --init CHECKPOINT_PATH        # signed IF, T=15
    python eval.py -d voc -v yolov2_tiny --bit 2 --spike -u --init CHECKPOINT_PATH            # unsigned IF, T=3
    python eval.py -d coco-val -v yolov2_r34 --bit 3 --spike --init CHECKPOINT_PATH --plot

VOC: VOC07 11-point mAP@0.5 (and the all-point AP); COCO: AP@[.5:.95], AP50, ... (pycocotools).
With --spike the quantized ANN runs on the same images (ann_map), the mAP after every time step
t = 1..T comes from the same pass (per_step_map), with per-layer firing rate / agreement, SOPs and
energy. Version, bits, width, classes and input size come from the checkpoint unless given. Writes
metrics_ann_eval.json or metrics_snn_<neuron>_T<T>[_settle<K>].json next to the checkpoint (or --metrics-out).
"""
from common.cli import ArgumentParser, unshadow_script_dir

unshadow_script_dir(__file__)

from common import run_cli  # noqa: E402
from detection import workflow as W  # noqa: E402


def get_parser() -> ArgumentParser:
    from common.pipeline import add_snn_args
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    W.add_model_args(p, bit_default=32)
    W.add_data_args(p, W.DATASETS_EVAL, "voc")
    W.add_runtime_args(p)
    W.add_size_arg(p)
    p.add_argument("-bs", "--batch_size", "--batch-size", dest="batch_size", type=int, default=8,
                   help="batch size per process (default 8)")
    p.add_argument("--spike", action="store_true", help="convert to an SNN (T = 2^bit - 1) and evaluate it next to the ANN")
    add_snn_args(p)
    W.add_post_args(p)
    return p


def main(argv=None):
    return W.evaluate(get_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
