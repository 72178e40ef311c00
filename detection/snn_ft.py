"""Layer-wise fine-tuning of a converted YOLOv2 SNN (beyond the original, which has none).

    python snn_ft.py -d voc -v yolov2_tiny --bit 2 -n 1 --init weights/voc/yolov2_tiny_2bit/model_best.pth.tar
    python snn_ft.py -d voc -v yolov2_tiny --bit 3 -n 1 --force --init CHECKPOINT_PATH

Each spiking layer in turn is trained to match the quantized ANN's activation from the SNN's input
rates; without --force a tuned layer is kept only when the SNN's mAP on the first --score-batches
training images (no augmentation) improves (--ft-accept local: when the layer's own rate error falls).
--method fastsnn (default) is that algorithm; --method fastsnn+e2e adds an end-to-end pass (all layers
together, loss --e2e-loss: the YOLO loss with the labels by default). Saved in ANN format to
<save_folder>/<dataset>/<version>_<bit>bit_ft/model_best.pth.tar (another --method: ..._ft_<method>/):
eval.py --spike --init reads it.
"""
from common.cli import ArgumentParser, unshadow_script_dir

unshadow_script_dir(__file__)

from common import run_cli  # noqa: E402
from detection import workflow as W  # noqa: E402


def get_parser() -> ArgumentParser:
    from common import runner
    from common.pipeline import add_snn_args
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    W.add_model_args(p, bit_default=2)
    W.add_data_args(p, W.DATASETS_TRAIN, "voc")
    W.add_runtime_args(p, train=True)
    W.add_size_arg(p)
    p.add_argument("-bs", "--batch_size", "--batch-size", dest="batch_size", type=int, default=8)
    p.add_argument("--aug", default="ssd", choices=("ssd", "flip", "none"),
                   help="augmentation of the fine-tuning batches (as train.py; default ssd)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (default 1e-3)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--weight_decay", "--weight-decay", dest="weight_decay", type=float, default=5e-4,
                   help="weight decay (default 5e-4)")
    runner.add_finetune_args(
        p, method=W.FT_METHOD, losses=("yolo", "mse"), default_loss="yolo", bn_default="recalibrate",
        loss_help="loss of the end-to-end stage: yolo = the YOLO training loss with the ground-truth boxes (default), "
                  "mse = squared error to the quantized ANN's raw predictions",
        score_default=8, score_help="without --force: judge each layer on the mAP of the first N training batches "
                                    "(default 8)")
    add_snn_args(p)
    W.add_post_args(p)
    return p


def main(argv=None):
    return W.finetune(get_parser().parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
