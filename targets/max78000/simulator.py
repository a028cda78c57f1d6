"""Bit-exact MAX78000 layer arithmetic (max78000.md §5.1) and ai8xize's checkpoint reading (§2.3).

All values are int64. Convolutions run as im2col products in float64: every product of an
int8 activation and a weight of at most 8 bits is below 2^14 in magnitude, so any sum of fewer
than 2^39 of them is exact in float64 and the BLAS product equals the integer result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from qcompiler.errors import TargetError
from qcompiler.targets.max78000.network import HwLayer, Network


@dataclasses.dataclass(frozen=True)
class LayerParams:
    """The integer parameters of one weight layer.

    Attributes:
        weights: ``q_w`` int64, ``(O, I, kh, kw)``, ``(O, I, k)`` or ``(O, I)``.
        bias: ``b_hw`` int64 ``(O,)`` or None.
        bits: weight bits ``b``.
        shift: the total hardware shift ``S = s + 8 − b``.
    """

    weights: np.ndarray
    bias: np.ndarray | None
    bits: int
    shift: int


def _as_int64(tensor: Any) -> np.ndarray:
    """ai8xize's ``tensor.numpy().astype(int64)`` (truncation toward zero)."""
    array = tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)
    return array.astype(np.int64)


def _scalar(tensor: Any) -> float:
    array = tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)
    return float(array.reshape(-1)[0])


def params_from_state_dict(
    network: Network, state_dict: Mapping[str, Any], source: str = "checkpoint"
) -> list[LayerParams | None]:
    """Read integer weights, biases, bits and shifts the way ai8xize does (§2.3).

    Weight keys are matched to the YAML's weight layers in order; the bias of ``X.weight`` is
    ``X.bias`` (same prefix); extra weight keys are ignored.

    Returns:
        One entry per network layer: :class:`LayerParams`, or None for passthrough layers.

    Raises:
        TargetError: too few weight keys, 1-D weights (unfolded BatchNorm), kernel size mismatch,
            out-of-range weights or biases.
    """
    weight_keys = [key for key in state_dict if key.rsplit(".", 1)[-1] == "weight"]
    slots = network.weight_layers()
    if len(weight_keys) < len(slots):
        raise TargetError(
            f"{source}: {len(weight_keys)} weight keys for {len(slots)} weight layers in the YAML"
        )
    params: list[LayerParams | None] = [None] * len(network.layers)
    for index, key in zip(slots, weight_keys):
        params[index] = _layer_params(network.layers[index], index, key, state_dict, source)
    return params


def _layer_params(
    layer: HwLayer, index: int, key: str, state: Mapping[str, Any], source: str
) -> LayerParams:
    prefix = key[: -len(".weight")]
    layer_name = prefix.rsplit(".", 1)[0] if "." in prefix else prefix
    weights = _as_int64(state[key])
    where = f"{source}: layer {index} ({key})"
    if weights.ndim < 2:
        raise TargetError(f"{where}: 1-D weight; ensure the BatchNorm layers have been folded")
    stored_bits = state.get(f"{layer_name}.weight_bits")
    checkpoint_bits = int(_scalar(stored_bits)) if stored_bits is not None else 8
    checkpoint_bits = checkpoint_bits or 8
    bits = layer.quantization if layer.quantization is not None else checkpoint_bits
    if layer.quantization is None and not weights.any():
        bits = 1
    if layer.quantization is not None and (
        weights.min() < -(2 ** (bits - 1)) or weights.max() >= 2 ** (bits - 1)
    ):
        raise TargetError(f"{where}: weights exceed the {bits}-bit range of the YAML quantization")
    if layer.op in ("conv2d", "conv1d") and tuple(weights.shape[2:]) != tuple(layer.kernel_size):
        raise TargetError(
            f"{where}: kernel {tuple(weights.shape[2:])} does not match kernel_size {layer.kernel_size}"
        )
    bias = state.get(f"{prefix}.bias")
    b_hw = None
    if bias is not None:
        b_hw = np.floor_divide(_as_int64(bias), 2 ** (checkpoint_bits - 1))
        if b_hw.min() < -128 or b_hw.max() > 127:
            raise TargetError(f"{where}: bias exceeds int8 after dividing by 2^(weight_bits-1)")
    if layer.output_shift is not None:
        shift = layer.output_shift
    else:
        stored_shift = state.get(f"{layer_name}.output_shift")
        shift = int(_scalar(stored_shift)) if stored_shift is not None else 0
    return LayerParams(weights, b_hw, bits, shift + 8 - bits)


# --- arithmetic ------------------------------------------------------------------------------------


def pool(x: np.ndarray, layer: HwLayer) -> np.ndarray:
    """§5.1 step 3: max or truncating-average pooling, and ``pool_stride`` subsampling."""
    spatial = x.ndim - 1
    size = layer.pool_size[:spatial] if layer.pool is not None else (1,) * spatial
    stride = layer.pool_stride[:spatial]
    if layer.pool is None and all(s == 1 for s in stride):
        return x
    windows = sliding_window_view(x, size, axis=tuple(range(1, x.ndim)))
    windows = windows[(slice(None),) + tuple(slice(None, None, s) for s in stride)]
    axes = tuple(range(x.ndim, 2 * x.ndim - 1))
    if layer.pool == "avg":
        total = windows.sum(axis=axes)
        count = int(np.prod(size))
        return np.sign(total) * (np.abs(total) // count)
    return windows.max(axis=axes)


def accumulate(x: np.ndarray, layer: HwLayer, params: LayerParams) -> np.ndarray:
    """§5.1 steps 5–6: flatten, cross-correlation or linear product, plus ``128·b_hw``."""
    weights = params.weights
    if layer.op == "mlp":
        vector = x.reshape(-1)
        if vector.size != weights.shape[1]:
            raise TargetError(
                f"layer {layer.name}: linear input has {vector.size} values, weights expect "
                f"{weights.shape[1]}"
            )
        acc = weights.astype(np.float64) @ vector.astype(np.float64)
        acc = acc.reshape(-1, 1, 1)
    else:
        kernel = weights.shape[2:]
        pad = [(0, 0)] + [(layer.pad, layer.pad)] * len(kernel)
        padded = np.pad(x, pad)
        cols = sliding_window_view(padded, kernel, axis=tuple(range(1, padded.ndim)))
        # cols: (C, *out, *kernel) → (*out, C·kernel) to match weights (O, C, *kernel).
        spatial = cols.shape[1 : 1 + len(kernel)]
        cols = np.moveaxis(cols, 0, len(kernel)).reshape(int(np.prod(spatial)), -1)
        acc = weights.reshape(weights.shape[0], -1).astype(np.float64) @ cols.astype(np.float64).T
        acc = acc.reshape(weights.shape[0], *spatial)
    acc = np.rint(acc).astype(np.int64)
    if params.bias is not None:
        acc += 128 * params.bias.reshape((-1,) + (1,) * (acc.ndim - 1))
    return acc


def requantize(acc: np.ndarray, layer: HwLayer, shift: int) -> np.ndarray:
    """§5.1 steps 7–8: round half up by ``2^(S−7)``, clamp to int8, activation; or the raw 32-bit output."""
    if layer.output_width == 32:
        return acc
    k = 7 - shift
    y = (acc + (1 << (k - 1))) >> k if k > 0 else acc << -k
    y = np.clip(y, -128, 127)
    if layer.activation == "ReLU":
        return np.clip(y, 0, 127)
    if layer.activation == "Abs":
        return np.clip(np.abs(y), 0, 127)
    return y


def run_layer(x: np.ndarray, layer: HwLayer, params: LayerParams | None) -> np.ndarray:
    """One hardware layer on an int64 ``(C, H, W)`` or ``(C, L)`` input."""
    x = pool(x, layer)
    if layer.op == "passthrough":
        return x
    if params is None:
        raise TargetError(f"layer {layer.name}: no weights")
    return requantize(accumulate(x, layer, params), layer, params.shift)


def simulate(
    network: Network,
    params: Sequence[LayerParams | None],
    sample: np.ndarray,
    keep_all: bool = False,
) -> np.ndarray | list[np.ndarray]:
    """Run the network on one sample (§5.1).

    Args:
        network: the layers.
        params: per-layer parameters (see :func:`params_from_state_dict`).
        sample: int64 ``(C, H, W)``, ``(C, L)`` or ``(C,)`` (as ``(C, 1, 1)``) with values in [−128, 127].
        keep_all: return every layer's output instead of the last one.

    Raises:
        TargetError: a sample outside int8 or of the wrong rank.
    """
    x = np.asarray(sample)
    if x.ndim == 1:  # a feature vector enters the accelerator as C channels of 1x1
        x = x.reshape(-1, 1, 1)
    if x.ndim not in (2, 3):
        raise TargetError(f"sample input has shape {x.shape}; expected (C, H, W) or (C, L)")
    if not np.issubdtype(x.dtype, np.integer) or x.min() < -128 or x.max() > 127:
        raise TargetError("sample input must hold integers in [-128, 127]")
    x = x.astype(np.int64)
    outputs = []
    for layer, layer_params in zip(network.layers, params):
        x = run_layer(x, layer, layer_params)
        outputs.append(x)
    return outputs if keep_all else x
