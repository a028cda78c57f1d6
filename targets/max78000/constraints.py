"""MAX78000 placement (processors, data format, memory offsets; max78000.md §3.3) and the
hardware constraints of §4, each violation reported on one line naming the layer and rule."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from qcompiler.errors import TargetConstraintError
from qcompiler.targets.max78000.network import HwLayer, processor_count, processor_map

MAX_LAYERS = 32
MAX_CHANNELS = 1024
DATA_INSTANCE_BYTES = 32768
HALF_INSTANCE = 0x4000
KERNEL_WORDS = 768
KERNEL_WORD_BITS = 72
BIAS_MEMORIES = 4
BIAS_MEMORY_BYTES = 512
PROCESSORS = 64
#: Weight memory in bytes (64 processors × 768 words × 9 bytes), the default allocation budget.
WEIGHT_MEMORY_BYTES = PROCESSORS * KERNEL_WORDS * KERNEL_WORD_BITS // 8


def _error(
    index: int, layer: HwLayer, quantity: str, value: object, limit: str, hint: str = ""
) -> TargetConstraintError:
    node = layer.nodes[0] if layer.nodes else layer.name
    text = f"max78000: layer {index} ({node}): {quantity} = {value} exceeds {limit}."
    return TargetConstraintError(f"{text} {hint}".strip())


def pooled_dims(layer: HwLayer) -> tuple[int, ...]:
    """Spatial dims after the layer's pooling / pool_stride."""
    dims = layer.in_dims or (1, 1)
    size = layer.pool_size if layer.pool is not None else (1, 1)
    return tuple((d - p) // s + 1 for d, p, s in zip(dims, size, layer.pool_stride))


def output_dims(layer: HwLayer) -> tuple[int, ...]:
    """Spatial dims of the layer's output."""
    if layer.op == "mlp":
        return (1, 1)
    dims = pooled_dims(layer)
    if layer.op == "passthrough":
        return dims
    return tuple(d + 2 * layer.pad - k + 1 for d, k in zip(dims, layer.kernel_size))


def input_bytes(layer: HwLayer, hwc: bool = True) -> int:
    """Bytes the layer's input occupies in each data memory instance."""
    area = int(np.prod(layer.in_dims or (1,)))
    return area * math.ceil(layer.in_channels / 64) * (4 if hwc else 1)


def output_bytes(layer: HwLayer) -> int:
    """Bytes the layer's output occupies in each data memory instance."""
    return (
        int(np.prod(output_dims(layer)))
        * math.ceil(layer.out_channels / 64)
        * 4
        * layer.output_width
        // 8
    )


def place(layers: Sequence[HwLayer]) -> list[HwLayer]:
    """Fill processors, the first layer's data format, out_offset ping-pong and output widths (§3.3).

    Raises:
        TargetConstraintError: input too large for HWC and CHW, or a layer's data does not fit.
    """
    placed: list[HwLayer] = []
    in_offset = 0
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        data_format, chw = None, False
        if i == 0:
            area = int(np.prod(layer.in_dims or (1,)))
            if area * math.ceil(layer.in_channels / 64) * 4 <= HALF_INSTANCE:
                data_format = "HWC"
            elif layer.in_channels <= 16 and area <= HALF_INSTANCE:
                data_format, chw = "CHW", True
            else:
                raise _error(
                    i,
                    layer,
                    "input size",
                    f"{area} x {layer.in_channels} channels",
                    "the data memory",
                    "Streaming/FIFO input is not supported.",
                )
        width = 32 if last and layer.activation is None and layer.op != "passthrough" else 8
        layer = dataclasses.replace(
            layer,
            data_format=data_format,
            output_width=width,
            processors=processor_map(layer.in_channels, chw),
        )
        size_in = input_bytes(layer, hwc=not chw)
        size_out = output_bytes(layer)
        if size_in <= HALF_INSTANCE and size_out <= HALF_INSTANCE:
            out_offset = HALF_INSTANCE if in_offset == 0 else 0
        elif size_out <= in_offset:
            out_offset = 0
        elif 4 * math.ceil((in_offset + size_in) / 4) + size_out <= DATA_INSTANCE_BYTES:
            out_offset = 4 * math.ceil((in_offset + size_in) / 4)
        else:
            raise _error(
                i,
                layer,
                "data memory (input + output bytes per instance)",
                size_in + size_out,
                f"{DATA_INSTANCE_BYTES}",
                "Reduce the feature map size or channels (rule §4.16).",
            )
        placed.append(dataclasses.replace(layer, out_offset=out_offset))
        in_offset = out_offset
    return placed


def _check_layer(i: int, layer: HwLayer, first: bool) -> None:
    if layer.in_channels > MAX_CHANNELS or layer.out_channels > MAX_CHANNELS:
        raise _error(
            i,
            layer,
            "channels",
            max(layer.in_channels, layer.out_channels),
            f"{MAX_CHANNELS} (rule §4.6)",
        )
    if layer.op == "conv2d" and layer.kernel_size not in ((1, 1), (3, 3)):
        raise _error(
            i,
            layer,
            "kernel",
            "x".join(map(str, layer.kernel_size)),
            "1x1 or 3x3 (rule §4.7)",
            "5x5/7x7 kernels are unsupported.",
        )
    if layer.op == "conv1d" and not 1 <= layer.kernel_size[0] <= 9:
        raise _error(i, layer, "conv1d kernel", layer.kernel_size[0], "1..9 (rule §4.8)")
    if layer.op in ("conv2d", "conv1d") and (
        layer.pad not in (0, 1, 2) or layer.pad >= min(layer.kernel_size)
    ):
        raise _error(i, layer, "pad", layer.pad, "{0, 1, 2} and pad < kernel (rule §4.10)")
    if layer.pool is not None or layer.pool_stride != (1, 1):
        size = layer.pool_size if layer.pool is not None else (1, 1)
        spatial = 1 if layer.op == "conv1d" or len(layer.in_dims or ()) == 1 else 2
        if any(not 1 <= p <= 16 for p in size[:spatial]) or any(
            not 1 <= s <= 16 for s in layer.pool_stride[:spatial]
        ):
            raise _error(
                i, layer, "pooling", f"{size} stride {layer.pool_stride}", "1..16 (rule §4.12)"
            )
        if spatial == 2 and layer.pool_stride[0] != layer.pool_stride[1]:
            raise _error(i, layer, "pool stride", layer.pool_stride, "a square stride (rule §4.12)")
        if any(d < 1 for d in pooled_dims(layer)):
            raise _error(i, layer, "pooled output", pooled_dims(layer), "at least 1 (rule §4.12)")
    if (
        layer.op == "passthrough"
        and layer.in_channels > 64
        and int(np.prod(pooled_dims(layer))) > 1
    ):
        raise _error(
            i,
            layer,
            "passthrough channels",
            layer.in_channels,
            "64 (rule §4.13: pooling in one pass)",
        )
    if layer.flatten and int(np.prod(pooled_dims(layer))) > 256:
        raise _error(
            i,
            layer,
            "flattened H*W",
            int(np.prod(pooled_dims(layer))),
            "256 (rule §4.14)",
            "Pool further before the linear layer.",
        )
    for dims, channels, what in (
        (layer.in_dims or (1,), layer.in_channels, "input"),
        (output_dims(layer), layer.out_channels, "output"),
    ):
        if any(not 1 <= d <= 1024 for d in dims):
            raise _error(i, layer, f"{what} dims", dims, "1..1024 (rule §4.15)")
        if int(np.prod(dims)) * math.ceil(channels / 64) >= 2**21:
            raise _error(
                i,
                layer,
                f"{what} H*W*ceil(C/64)",
                int(np.prod(dims)) * math.ceil(channels / 64),
                "2^21 (rule §4.15)",
            )
    if first and layer.data_format == "CHW" and layer.in_channels > 16:
        raise _error(i, layer, "CHW input channels", layer.in_channels, "16 (rule §4.17)")


def kernel_words(layer: HwLayer, bits: int) -> int:
    """Kernel memory words the layer uses on each of its input processors (rule §4.19)."""
    slots = processor_count(layer.out_channels) * math.ceil(layer.out_channels / 64)
    kc = slots * math.ceil(layer.in_channels / 64)
    if layer.flatten:
        kc *= int(np.prod(pooled_dims(layer)))
    area = int(np.prod(layer.kernel_size)) if layer.op != "mlp" else 1
    per_word = 8 // bits
    remainder = (kc % per_word) * area * (per_word - 1)
    return math.ceil((kc * area * bits + remainder) / KERNEL_WORD_BITS)


def check(
    layers: Sequence[HwLayer],
    bits: Sequence[int | None],
    shifts: Sequence[int | None],
    has_bias: Sequence[bool],
) -> dict[str, object]:
    """Check every §4 constraint on placed layers; return the memory use for the report.

    Args:
        layers: placed layers.
        bits: weight bits per layer (None for passthrough).
        shifts: total shift ``S`` per layer (None for passthrough).
        has_bias: whether each layer has a bias.

    Raises:
        TargetConstraintError: the first violation, naming the layer, quantity and limit.
    """
    if len(layers) > MAX_LAYERS:
        raise _error(
            MAX_LAYERS, layers[MAX_LAYERS], "layer count", len(layers), f"{MAX_LAYERS} (rule §4.1)"
        )
    words = np.zeros(PROCESSORS, dtype=np.int64)
    bias_sizes: list[tuple[int, int]] = []
    for i, layer in enumerate(layers):
        _check_layer(i, layer, first=i == 0)
        if layer.op == "passthrough":
            continue
        if bits[i] not in (1, 2, 4, 8):
            raise _error(i, layer, "weight bits", bits[i], "{1, 2, 4, 8} (rule §4.18)")
        if shifts[i] is not None and not -15 <= shifts[i] <= 15:
            raise _error(i, layer, "output shift S", shifts[i], "[-15, 15] (rule §4.22)")
        used = kernel_words(layer, bits[i])
        mask = np.array([(layer.processors >> p) & 1 for p in range(PROCESSORS)], dtype=bool)
        words[mask] += used
        if words.max() > KERNEL_WORDS:
            raise _error(
                i,
                layer,
                "kernel memory words per processor",
                int(words.max()),
                f"{KERNEL_WORDS} (rule §4.19)",
                "Use fewer weight bits (--weight-bits or a --total-bytes budget).",
            )
        if has_bias[i]:
            if layer.out_channels > BIAS_MEMORY_BYTES:
                raise _error(
                    i, layer, "bias bytes", layer.out_channels, f"{BIAS_MEMORY_BYTES} (rule §4.20)"
                )
            bias_sizes.append((layer.out_channels, i))
    free = [BIAS_MEMORY_BYTES] * BIAS_MEMORIES
    bias_memory: dict[int, int] = {}
    for size, i in sorted(bias_sizes, reverse=True):  # first-fit decreasing
        slot = next((m for m in range(BIAS_MEMORIES) if free[m] >= size), None)
        if slot is None:
            raise _error(
                i,
                layers[i],
                "bias memory",
                sum(s for s, _ in bias_sizes),
                f"{BIAS_MEMORIES} x {BIAS_MEMORY_BYTES} B (rule §4.20)",
            )
        free[slot] -= size
        bias_memory[i] = slot
    return {
        "kernel_words_max": int(words.max()),
        "kernel_words_limit": KERNEL_WORDS,
        "kernel_words_per_processor": [int(w) for w in words],
        "bias_bytes": int(sum(s for s, _ in bias_sizes)),
        "bias_memory_of_layer": {str(k): v for k, v in sorted(bias_memory.items())},
        "data_offsets": [layer.out_offset for layer in layers],
    }
