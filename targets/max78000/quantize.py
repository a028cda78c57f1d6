"""Drop-in replacement for ai8x-synthesis ``quantize.py`` (max78000.md §1).

QAT mode (no clip method) reproduces upstream bit-exactly; it runs on float32 torch tensors with
``torch.quantile`` and ``torch.log2`` exactly as upstream does, so no float32 step is emulated.
The ``--clip-method`` modes follow the project semantics of §1.6: they choose the clipping
threshold differently but write the same function-preserving format as QAT mode (upstream
crashes on layers with biases and writes factors without an ``output_shift``).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qcompiler.errors import CheckpointError
from qcompiler.targets.max78000.checkpoint import require_torch

#: ``--clip-method`` choices (upstream's names).
CLIP_METHODS = ("AVGMAX", "MAX", "STDDEV", "SCALE")
#: ``--device`` spellings upstream accepts, by canonical device.
DEVICES = {
    "MAX78000": ("max78000", "78000", "ai85", "85"),
    "MAX78002": ("max78002", "78002", "ai87", "87"),
    "CMSIS-NN": ("cmsis-nn",),
}
LEGAL_WEIGHT_BITS = (1, 2, 4, 8)
DEFAULT_SCALE = 0.85
DEFAULT_STDDEV = 2.0
#: ai8x BatchNorm folding (max78000.md §2.4): ai8x layers compute bn(y)/4.
AI8X_BN_FACTOR = 0.25
BN_EPS = 1e-5


def canonical_device(name: str) -> str:
    """Upstream's device spelling → ``MAX78000``/``MAX78002``/``CMSIS-NN``.

    Raises:
        CheckpointError: unknown device.
    """
    for device, spellings in DEVICES.items():
        if name.lower() in spellings:
            return device
    known = ", ".join(s for spellings in DEVICES.values() for s in spellings)
    raise CheckpointError(f"unknown device {name!r} (known: {known})")


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """Options of ``quantize.py``.

    Attributes:
        device: ``--device`` (any upstream spelling).
        clip_method: None for QAT mode, else one of :data:`CLIP_METHODS`.
        qat_weight_bits: third-priority weight width (after YAML and the checkpoint's weight_bits).
        scale: the SCALE method's fraction of the maximum (default 0.85).
        stddev: the STDDEV method's number of standard deviations (default 2.0).
        bias_range: ``"bits"`` clamps the bias to the weight width (upstream); ``"int8"`` to int8.
    """

    device: str = "MAX78000"
    clip_method: str | None = None
    qat_weight_bits: int | None = None
    scale: float | None = None
    stddev: float | None = None
    bias_range: str = "bits"

    def __post_init__(self) -> None:
        canonical_device(self.device)
        if self.clip_method is not None and self.clip_method not in CLIP_METHODS:
            raise CheckpointError(
                f"--clip-method {self.clip_method!r}: choose one of {', '.join(CLIP_METHODS)}"
            )
        if self.qat_weight_bits is not None and self.qat_weight_bits not in LEGAL_WEIGHT_BITS:
            raise CheckpointError(
                f"--qat-weight-bits {self.qat_weight_bits}: must be one of 1, 2, 4, 8"
            )
        if self.scale is not None and not 0.0 < self.scale <= 1.0:
            raise CheckpointError(f"--scale {self.scale}: must be in (0, 1]")
        if self.stddev is not None and not self.stddev > 0.0:
            raise CheckpointError(f"--stddev {self.stddev}: must be positive")
        if self.bias_range not in ("bits", "int8"):
            raise CheckpointError(f"bias_range {self.bias_range!r}: choose 'bits' or 'int8'")


@dataclasses.dataclass(frozen=True)
class LayerQuantization:
    """What happened to one weight key.

    Attributes:
        key: the weight key.
        bits: weight bits ``b``.
        bit_shift: the power of two applied (``output_shift = -bit_shift``).
        clamped_weights: weights that saturated at the ``b``-bit range.
        clamped_biases: biases that saturated.
        shift_clamped: the bit_shift hit its clamp (weights saturate or vanish).
    """

    key: str
    bits: int
    bit_shift: int
    clamped_weights: int
    clamped_biases: int
    shift_clamped: bool


@dataclasses.dataclass(frozen=True)
class ConversionResult:
    """The quantized checkpoint, per-layer facts and warnings about upstream differences."""

    checkpoint: dict[str, Any]
    layers: tuple[LayerQuantization, ...]
    warnings: tuple[str, ...]


def split_key(key: str) -> tuple[str, str | None, str]:
    """Upstream's ``rsplit('.', 2)``: ``(layer, op, param)`` or ``(layer, None, param)``."""
    parts = key.rsplit(".", 2)
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return "", None, parts[0]


def _bias_key(layer: str, op: str | None) -> str:
    return f"{layer}.{op}.bias" if op is not None else f"{layer}.bias"


def _np_str(value: Any) -> str:
    """numpy's float32 ``str`` (shortest round trip), as upstream prints its statistics."""
    return str(np.float32(value.item() if hasattr(value, "item") else value))


def avgmax(tensor: Any) -> Any:
    """Upstream's AVGMAX statistic: view as (O, -1), the larger |mean| of row minima and maxima."""
    rows = tensor.reshape(tensor.shape[0], -1)
    return max(rows.min(dim=1).values.mean().abs(), rows.max(dim=1).values.mean().abs())


def stat_line(key: str, tensor: Any, factor: Any, bits: int) -> str:
    """One ``-v`` line: ``<key> avg_max: a max: m mean: u factor: f bits: b``."""
    maximum = max(tensor.min().abs(), tensor.max().abs())
    factor_text = str(factor.numpy()) if hasattr(factor, "numpy") else str(factor)
    return (
        f"{key} avg_max: {_np_str(avgmax(tensor))} max: {_np_str(maximum)} "
        f"mean: {_np_str(tensor.mean())} factor: {factor_text} bits: {bits}"
    )


def _threshold(
    torch: Any, options: QuantizeOptions, weight: Any, params: Any, quantile: Any
) -> Any:
    """The clipping threshold ``L`` of §1.4 step 2 (QAT) or §1.6 (clip methods)."""
    method = options.clip_method
    if method is None:
        return torch.quantile(params.abs(), quantile)
    if method == "MAX":
        return params.abs().max()
    if method == "AVGMAX":
        return avgmax(weight)
    if method == "SCALE":
        return (
            torch.tensor(options.scale or DEFAULT_SCALE, dtype=torch.float32) * params.abs().max()
        )
    n = torch.tensor(options.stddev or DEFAULT_STDDEV, dtype=torch.float32)
    mean, std = params.mean(), params.std()
    return max(
        torch.maximum(params.min(), mean - n * std).abs(),
        torch.minimum(params.max(), mean + n * std).abs(),
    )


def quantize_tensors(
    weight: Any, bias: Any | None, bits: int, threshold: Any, bias_range: str = "bits"
) -> tuple[Any, Any | None, Any, Any, LayerQuantization]:
    """§1.4 steps 3–5 on float32 torch tensors.

    Returns:
        ``(q_w, stored_bias, bit_shift, factor, facts)``: integer-valued float32 weights, the
        stored bias ``Bq·2^(b−1)`` (None without a bias), the bit shift tensor, the factor
        ``2^(b−1)·2^bit_shift`` and the per-layer facts (key left empty).
    """
    torch = require_torch()
    bit_shift = torch.clamp(torch.floor(torch.log2(1.0 / threshold)), min=-7 - bits, max=23 - bits)
    dist = 2.0**bit_shift
    factor = 2 ** (bits - 1) * dist
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    raw = torch.floor(weight * factor + 0.5)
    q_w = raw.clamp(min=lo, max=hi)
    stored, clamped_b = None, 0
    if bias is not None:
        raw_b = torch.floor((bias * dist) * 2 ** (bits - 1) + 0.5)
        b_lo, b_hi = (lo, hi) if bias_range == "bits" else (-128, 127)
        bq = raw_b.clamp(min=b_lo, max=b_hi)
        clamped_b = int((bq != raw_b).sum())
        stored = bq * 2 ** (bits - 1)
    shift = int(bit_shift.reshape(-1)[0])
    facts = LayerQuantization(
        key="",
        bits=bits,
        bit_shift=shift,
        clamped_weights=int((q_w != raw).sum()),
        clamped_biases=clamped_b,
        shift_clamped=shift in (-7 - bits, 23 - bits),
    )
    return q_w, stored, bit_shift, factor, facts


def fold_ai8x_batchnorm(state: OrderedDict[str, Any], warn: Callable[[str], None]) -> None:
    """Fold unfused ``<layer>.bn.*`` keys into ``<layer>.op.*`` with ai8x's 0.25 factor (§2.4).

    Raises:
        CheckpointError: BN keys without the running statistics or without an ``op.weight``.
    """
    torch = require_torch()
    layers = sorted({key.rsplit(".bn.", 1)[0] for key in state if ".bn." in key})
    for layer in layers:
        mean, var = state.get(f"{layer}.bn.running_mean"), state.get(f"{layer}.bn.running_var")
        weight = state.get(f"{layer}.op.weight")
        if mean is None or var is None or weight is None:
            raise CheckpointError(
                f"layer {layer!r}: BatchNorm keys cannot be folded (need {layer}.op.weight, "
                "bn.running_mean and bn.running_var)"
            )
        gamma = state.get(f"{layer}.bn.weight", torch.ones_like(mean)) * AI8X_BN_FACTOR
        beta = state.get(f"{layer}.bn.bias", torch.zeros_like(mean)) * AI8X_BN_FACTOR
        scale = gamma / torch.sqrt(var + BN_EPS)
        bias = state.get(f"{layer}.op.bias", torch.zeros_like(mean))
        state[f"{layer}.op.weight"] = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        folded_bias = (bias - mean) * scale + beta
        for key in [k for k in state if k.startswith(f"{layer}.bn.")]:
            del state[key]
        _insert_after(state, f"{layer}.op.weight", f"{layer}.op.bias", folded_bias)
        warn(
            f"{layer}: BatchNorm folded into op.weight/op.bias with the ai8x rule (gamma/4, beta/4)"
        )


def _insert_after(state: OrderedDict[str, Any], anchor: str, key: str, value: Any) -> None:
    if key in state:
        state[key] = value
        return
    items = list(state.items())
    state.clear()
    for name, tensor in items:
        state[name] = tensor
        if name == anchor:
            state[key] = value


def convert_checkpoint(
    checkpoint: dict[str, Any],
    options: QuantizeOptions = QuantizeOptions(),
    yaml_bits: Sequence[int | None] | None = None,
    verbose: Callable[[str], None] | None = None,
) -> ConversionResult:
    """Quantize a training checkpoint the way ai8x-synthesis ``quantize.py`` does.

    Args:
        checkpoint: a loaded checkpoint (see :func:`~.checkpoint.load_checkpoint`).
        options: device, clip method and bit options.
        yaml_bits: ``quantization`` of each YAML *weight* layer in order (None entries fall
            through), from ``-c``; None without a YAML.
        verbose: receives upstream's ``-v`` printout, line by line.

    Returns:
        The quantized checkpoint (epoch, arch, state_dict, extras), per-layer facts and warnings.

    Raises:
        CheckpointError: malformed state_dict (non-zero zero points, un-foldable BN, 1-D weights).
    """
    torch = require_torch()
    warnings: list[str] = []
    state: OrderedDict[str, Any] = OrderedDict(checkpoint["state_dict"])
    if any(".bn." in key for key in state):
        fold_ai8x_batchnorm(state, warnings.append)
    if verbose is not None:
        verbose("")
        verbose("Model keys (state_dict):")
        verbose(", ".join(state.keys()))
    out: OrderedDict[str, Any] = OrderedDict(state)
    layers: list[LayerQuantization] = []
    weight_index = 0
    for key in list(state.keys()):
        layer, op, param = split_key(key)
        if param == "weight":
            facts = _quantize_weight_key(
                torch,
                state,
                out,
                key,
                layer,
                op,
                options,
                yaml_bits,
                weight_index,
                verbose,
                warnings,
            )
            layers.append(facts)
            weight_index += 1
        elif param in ("w_zero_point", "b_zero_point"):
            if bool((state[key] != 0).any()):
                raise CheckpointError(
                    f"{key}: non-zero zero point (MAX78000 quantization is symmetric)"
                )
            del out[key]
        elif param == "base_b_q":
            del out[key]
        elif param == "adjust_output_shift":
            out[key] = torch.tensor([0.0])
        elif param == "quantize_activation":
            out[key] = torch.tensor([1.0])
    extras = dict(checkpoint.get("extras") or {})
    if options.clip_method is None:
        extras["clipping_method"] = "MAX_BIT_SHIFT"
    else:
        extras["clipping_method"] = options.clip_method
        if options.clip_method == "SCALE":
            extras["clipping_scale"] = options.scale or DEFAULT_SCALE
        if options.clip_method == "STDDEV":
            extras["clipping_nstds"] = options.stddev or DEFAULT_STDDEV
        warnings.append(
            f"--clip-method {options.clip_method}: written in the QAT format with output_shift "
            "(upstream multiplies by the statistic, omits output_shift and crashes on biases)"
        )
    result = {key: checkpoint[key] for key in ("epoch", "arch") if key in checkpoint}
    result.update(state_dict=out, extras=extras)
    return ConversionResult(result, tuple(layers), tuple(warnings))


def _weight_bits(
    state: dict[str, Any],
    layer: str,
    options: QuantizeOptions,
    yaml_bits: Sequence[int | None] | None,
    index: int,
    warnings: list[str],
) -> int:
    """§1.3 priority: YAML ``quantization`` → checkpoint ``weight_bits`` → ``--qat-weight-bits`` → 8."""
    if yaml_bits is not None:
        if index < len(yaml_bits):
            if yaml_bits[index] is not None:
                return int(yaml_bits[index])
        else:
            warnings.append(
                f"{layer}: weight key beyond the YAML's weight layers, quantized anyway "
                "(upstream leaves it float)"
            )
    stored = state.get(f"{layer}.weight_bits")
    if stored is not None and int(stored.reshape(-1)[0]) != 0:
        return int(stored.reshape(-1)[0])
    return options.qat_weight_bits or 8


def _quantize_weight_key(
    torch: Any,
    state: dict[str, Any],
    out: dict[str, Any],
    key: str,
    layer: str,
    op: str | None,
    options: QuantizeOptions,
    yaml_bits: Sequence[int | None] | None,
    index: int,
    verbose: Callable[[str], None] | None,
    warnings: list[str],
) -> LayerQuantization:
    weight = state[key].to(torch.float32)
    if weight.dim() < 2:
        raise CheckpointError(
            f"{key}: a 1-D weight is not a MAX78000 layer (fold BatchNorm before quantizing)"
        )
    bits = _weight_bits(state, layer, options, yaml_bits, index, warnings)
    if bits not in LEGAL_WEIGHT_BITS:
        raise CheckpointError(f"{key}: weight bits {bits} not in 1, 2, 4, 8")
    bias_key = _bias_key(layer, op)
    bias = state.get(bias_key)
    bias = bias.to(torch.float32) if bias is not None else None
    params = torch.cat((weight.flatten(), bias.flatten())) if bias is not None else weight.flatten()
    quantile = state.get(f"{layer}.shift_quantile", 1.0)
    threshold = _threshold(torch, options, weight, params, quantile)
    q_w, stored_bias, bit_shift, factor, facts = quantize_tensors(
        weight, bias, bits, threshold, options.bias_range
    )
    if verbose is not None:
        verbose(stat_line(key, weight, factor, bits))
        if bias is not None:
            verbose(stat_line(bias_key, bias, factor, bits))
    out[key] = q_w
    if stored_bias is not None:
        out[bias_key] = stored_bias
        out[f"{layer}.bias_bits"] = torch.tensor([float(bits)])
    bits_key = f"{layer}.weight_bits"
    existing = state.get(bits_key)
    if existing is None or int(existing.reshape(-1)[0]) != bits:
        if existing is None and bits != 8:
            warnings.append(f"{bits_key}: written as {bits} (upstream writes 8 whatever the bits)")
        out[bits_key] = torch.tensor([float(bits)])
    out[f"{layer}.output_shift"] = (-bit_shift).reshape(1).to(torch.float32)
    return dataclasses.replace(facts, key=key)


def yaml_weight_bits(path: str | Path, warn: Callable[[str], None]) -> list[int | None]:
    """``quantization`` of each weight layer of a network YAML (ai8xize's matching, §1.3).

    Upstream indexes YAML layers by a running weight-key counter, which differs when a
    passthrough layer precedes a weight layer; the project skips weight-less layers and warns.
    """
    from qcompiler.targets.max78000.network import load_network

    network = load_network(path)
    slots = network.weight_layers()
    if slots != list(range(len(slots))):
        warn(
            f"{path}: passthrough layers shift upstream's layer counter; bits are matched to weight layers instead"
        )
    return [network.layers[i].quantization for i in slots]


def quantize_file(
    source: str | Path,
    destination: str | Path,
    options: QuantizeOptions = QuantizeOptions(),
    config_file: str | Path | None = None,
    echo: Callable[[str], None] | None = None,
    warn: Callable[[str], None] = lambda text: None,
) -> ConversionResult:
    """``quantize.py INPUT OUTPUT``: load safely, quantize, write atomically.

    Args:
        source: the training checkpoint.
        destination: the quantized checkpoint to write.
        options: the command-line options.
        config_file: ``-c`` network YAML with per-layer ``quantization``.
        echo: receives the ``-v`` printout (None: quiet).
        warn: receives warnings about upstream differences.

    Raises:
        CheckpointError: unreadable or refused checkpoint, bad options.
        TargetError: an invalid YAML.
    """
    from qcompiler.targets.max78000.checkpoint import load_checkpoint, save_checkpoint

    device = canonical_device(options.device)
    if echo is not None:
        echo(f"Configuring device: {device}")
        echo(f"Converting checkpoint file {source} to {destination}")
    checkpoint = load_checkpoint(source)
    if "extras" not in checkpoint:
        warn(f"{source}: no 'extras' in checkpoint")
    bits = yaml_weight_bits(config_file, warn) if config_file is not None else None
    result = convert_checkpoint(checkpoint, options, bits, echo)
    for text in result.warnings:
        warn(text)
    save_checkpoint(result.checkpoint, destination)
    return result
