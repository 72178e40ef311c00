"""Shared quantizer of Fast-SNN: uniform activations with a learnable clip, APoT / ternary weights."""
from .functional import (FULL_PRECISION, act_levels, act_quant, act_quant_levels, check_bit, default_weight_mode,
                         num_levels, project, project_magnitude, round_half_up, standardize,
                         weight_levels, weight_magnitudes, weight_quant, weight_quant_8bit)
from .layers import (ACT_ALPHA, DEFAULT_ACT_ALPHA, DEFAULT_WGT_ALPHA, WGT_ALPHA, WEIGHT_LAYERS,
                     Conv2d8bit, Linear8bit, QuantAct, QuantConv2d, QuantLinear, effective_weight)
from .quantize import CALIBRATION_PERCENTILE, UnsupportedLayerError, calibrate, quantize
from .utils import (CheckpointMismatchError, activation_bits, is_full_precision, load_init, randomize_bn,
                    quant_params, show_params, strip_prefix, weight_bits)

__all__ = [n for n in dir() if not n.startswith("_")]
