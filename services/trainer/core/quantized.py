"""bitsandbytes 4-bit layers on the CPU: the AVX512-BF16 weight repacking kept out of every job.

bitsandbytes 0.50, on a CPU whose flags include `avx512_bf16`, repacks a `Linear4bit`'s
weight the first time the layer runs in eval mode without gradients
(`_convert_weight_packed_for_cpu`), for a bfloat16 kernel (`gemv_4bit`) that has no
autograd. Three things go wrong in a training job:

- the repacking assumes `in_features` is a multiple of the quantisation block (64) and
  crashes below it;
- once repacked, a later training epoch runs through that kernel too, so no gradient flows
  through the frozen base: every adapter below the top layer stops learning (silently);
- the repacking stores the block scales as bfloat16 and undoes double quantisation; going
  back (`_convert_weight_packed_for_cpu_inverse`) re-quantises them, so even an unpacked
  weight is not the weight a fresh load gives.

So the trainer never lets a layer repack: `disable_cpu_repacking` turns the layer's switch
(`support_avx512bf16_for_cpu`, set by bitsandbytes from the CPU's flags) off on every 4-bit
layer it loads, whatever the CPU, and `has_repacked_weights` tells the warm base cache that
a base was repacked behind its back (it then loads the base again instead of reusing it).
Evaluation thus computes exactly as training does, and every CPU gives the same numbers.
"""

from __future__ import annotations

import logging

from torch import nn

__all__ = ["REPACK_SWITCH", "disable_cpu_repacking", "four_bit_layers", "has_repacked_weights"]

logger = logging.getLogger(__name__)

# The Linear4bit attribute bitsandbytes reads before repacking (set from `has_avx512bf16()`).
REPACK_SWITCH = "support_avx512bf16_for_cpu"


def four_bit_layers(model: nn.Module) -> list[nn.Module]:
    """Every bitsandbytes `Linear4bit` in `model` (none when bitsandbytes is not installed)."""
    try:
        from bitsandbytes.nn.modules import Linear4bit
    except ImportError:  # pragma: no cover - the trainer extra installs it
        return []
    return [module for module in model.modules() if isinstance(module, Linear4bit)]


def disable_cpu_repacking(model: nn.Module) -> int:
    """Turn the CPU repacking off on every 4-bit layer; returns how many had it on."""
    switched = 0
    for layer in four_bit_layers(model):
        if getattr(layer, REPACK_SWITCH, False):
            switched += 1
        setattr(layer, REPACK_SWITCH, False)
    if switched:
        logger.debug("CPU weight repacking turned off on %d 4-bit layers", switched)
    return switched


def has_repacked_weights(model: nn.Module) -> bool:
    """True when some 4-bit layer's weight is in bitsandbytes' CPU-repacked layout."""
    for layer in four_bit_layers(model):
        state = getattr(layer.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            return True
    return False
