"""Layer-wise fine-tuning of a converted ImageNet SNN, signed IF neurons by default.

The original README's commands; they run under DDP and, unlike the original, in one process too:

    python -m torch.distributed.launch --nproc_per_node=4 snn_ft.py -a alexnet -b 128 --bit 3 --init result/alexnet_3bit/model_best.pth.tar --workers 4 --dali_cpu /data/imagenet2012
    python -m torch.distributed.launch --nproc_per_node=4 snn_ft.py -a alexnet -b 128 --bit 2 --init result/alexnet_2bit/model_best.pth.tar --workers 4 --dali_cpu /data/imagenet2012

-n epochs per layer (default 1), SGD lr 1e-3 (--lr), momentum 0.9, wd 1e-4; BN re-estimated from SNN
rates (the original's ImageNet behaviour, --ft-bn frozen to keep it); --method STAGES as in the CIFAR
snn_ft.py (default fastsnn+e2e; fastsnn: the original alone). Without --force a tuned layer
is kept only if the whole SNN's train-set top-1 improves (a full pass over the training set per layer
and epoch; --score-batches N judges on N batches). Saves (rank 0)
result/imagenet/<arch>_<bit>bit_ft/model_best.pth.tar (an ANN-format state dict, reloadable by snn.py --init)
and metrics_snn_ft_<neuron>_T<T>.json. -e evaluates the SNN of --init on the validation set and stops.
"""
from common.cli import unshadow_script_dir

unshadow_script_dir(__file__)  # this folder's snn.py must not shadow the snn package

from classification import workflow  # noqa: E402
from classification.imagenet import task  # noqa: E402
from common import run_cli  # noqa: E402


def get_parser():
    return task.get_parser("ft", __doc__.split("\n\n")[0])


def main(argv=None):
    args = task.parse_args("ft", argv, __doc__.split("\n\n")[0])
    return workflow.finetune_snn(args, task.prepare(args, "ft"))


if __name__ == "__main__":
    run_cli(main)
