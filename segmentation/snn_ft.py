"""Layer-wise fine-tuning of a converted segmenter SNN .

    python segmentation/snn_ft.py -d voc -m deeplabv1_vgg9 --bit 2 -n 1 --force \
        --init weights/voc/deeplabv1_vgg9_2bit/model_best.pth.tar
    python segmentation/snn_ft.py -d voc -m deeplabv1_vgg9 --bit 2 -n 1 --score-batches 4 --max-iters 20

Each spiking layer from the second on is tuned against the quantized ANN's activation (layer-local
MSE, straight-through gradient at the SNN's input rates). Without --force a tuned layer is kept only
if the SNN's mIoU on the first --score-batches training batches (un-augmented, padded to --test_size)
improves (--ft-accept local: when the layer's own rate error falls). --method fastsnn (default) is that
algorithm; --method fastsnn+e2e adds an end-to-end pass (loss --e2e-loss, per-pixel cross-entropy with the
labels by default). Saves <save_folder>/<dataset>/<model>_<bit>bit_ft/model_best.pth.tar (ANN format: eval.py
--spike --init reads it) and metrics_snn_ft_<neuron>_T<T>.json (before / after, per-layer history).
"""
from common.cli import ArgumentParser, unshadow_script_dir
from common.pipeline import add_snn_args

unshadow_script_dir(__file__)

from common import run_cli, runner  # noqa: E402
from segmentation import workflow  # noqa: E402


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    workflow.add_common_args(p, bit_default=2, script="ft", lr_default=1e-3, init_help=(
        "ANN checkpoint (default <save_folder>/<dataset>/<model>_<bit>bit/model_best.pth.tar)"))
    add_snn_args(p)
    runner.add_finetune_args(
        p, method=workflow.FT_METHOD, losses=("ce", "kl", "mse"), default_loss="ce",
        loss_help="loss of the end-to-end stage: ce = per-pixel cross-entropy with the label masks (ignore 255; "
                  "default), kl = per-pixel KL divergence to the quantized ANN's logits, mse = squared error to them",
        score_default=4, score_help="without --force: judge each layer on the SNN mIoU of this many training batches "
                                    "(default 4)")
    return p


def main(argv=None):
    return workflow.finetune(workflow.parse_args(get_parser(), argv))


if __name__ == "__main__":
    run_cli(main)
