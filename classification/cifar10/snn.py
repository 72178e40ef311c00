"""Convert a quantized CIFAR-10 ANN into an SNN (T = 2^bit - 1) and evaluate it on the test set.

    python snn.py --arch alex --bit 3 -id 0 -e --init result/alex_3bit/model_best.pth.tar      # signed IF, T=7
    python snn.py --arch alex --bit 2 -id 0 -e -u --init result/alex_2bit/model_best.pth.tar   # unsigned IF, T=3

Prints ' * Acc@1 .. Acc@5 ..' and writes metrics_snn_<signed|unsigned>_T<T>.json (accuracy vs t,
per-layer firing rate / agreement with the ANN, SOPs, energy) beside the --init checkpoint. -e is accepted
for compatibility: this script always evaluates. --init also accepts snn_ft.py's fine-tuned model.
"""
from common.cli import ArgumentParser, unshadow_script_dir

unshadow_script_dir(__file__)  # this file must not shadow the snn package

from classification import workflow  # noqa: E402
from classification.cifar10.task import TASK  # noqa: E402
from common import run_cli  # noqa: E402


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    workflow.add_common_args(p, TASK, script="snn", bit_default=2, print_freq_default=10,
                             init_help="ANN checkpoint (default <out>/<arch>_<bit>bit/model_best.pth.tar)")
    workflow.add_snn_args(p)
    return p


def main(argv=None):
    return workflow.evaluate_snn(get_parser().parse_args(argv), TASK)


if __name__ == "__main__":
    run_cli(main)
