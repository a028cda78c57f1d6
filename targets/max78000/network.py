"""The hardware layer list and the network YAML of ai8x-synthesis (max78000.md §3).

:class:`HwLayer` is the one description of a MAX78000 layer the project uses: the YAML parser
produces it, the legaliser of ONNX models produces it, the simulator, the ONNX simulation
model and the YAML writer consume it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qcompiler.errors import TargetError

OPS = ("conv2d", "conv1d", "mlp", "passthrough")
_OP_ALIASES = {
    "conv2d": "conv2d",
    "conv1d": "conv1d",
    "linear": "mlp",
    "fc": "mlp",
    "mlp": "mlp",
    "none": "passthrough",
    "passthrough": "passthrough",
}
_UNSUPPORTED_OPS = ("convtranspose2d", "add", "sub", "or", "xor")
_ACTIVATIONS = {"relu": "ReLU", "abs": "Abs", "none": None}
#: Keys that change values but that this project's simulator does not implement.
_UNSUPPORTED_KEYS = (
    "in_dim",
    "in_crop",
    "in_skip",
    "read_gap",
    "in_channel_skip",
    "in_sequences",
    "eltwise",
    "operands",
    "pool_first",
    "bypass",
    "weight_source",
    "pool_dilation",
    "output_pad",
    "streaming",
    "buffer_shift",
    "buffer_insert",
    "write_gap",
)
#: Keys that only place data (processors, memories, sequencing): accepted and ignored by values.
_PLACEMENT_KEYS = (
    "output_processors",
    "in_offset",
    "in_channels",
    "out_channels",
    "next_sequence",
    "sequence",
    "bias_group",
    "bias_quadrant",
    "calcx4",
    "readahead",
    "tcalc",
    "output",
    "simulated_sequence",
    "snoop_sequence",
)
_GLOBAL_KEYS = (
    "arch",
    "dataset",
    "layers",
    "output_map",
    "unload",
    "data_buffer",
    "snoop",
    "bias",
    "weights",
)


@dataclasses.dataclass(frozen=True)
class HwLayer:
    """One MAX78000 layer: optional pooling, one operation, activation, output format.

    Attributes:
        op: ``conv2d``, ``conv1d``, ``mlp`` or ``passthrough``.
        kernel_size: ``(kh, kw)`` for conv2d, ``(k,)`` for conv1d, ``(1, 1)`` otherwise.
        pad: symmetric zero padding.
        pool: ``"max"``, ``"avg"`` or None.
        pool_size: pooling window ``(ph, pw)`` (conv1d data: ``(p, 1)``).
        pool_stride: pooling stride ``(sh, sw)``; applies even without pooling.
        activation: ``"ReLU"``, ``"Abs"`` or None.
        flatten: flatten the (pooled) input before a linear layer.
        output_width: 8, or 32 for a raw accumulator output on the last layer.
        quantization: weight bits from the YAML (None: from the checkpoint).
        output_shift: YAML ``output_shift`` override (None: from the checkpoint).
        processors: input processor map.
        out_offset: output byte offset in the data memory instances.
        data_format: ``HWC`` or ``CHW`` (first layer only), else None.
        name: layer name (the checkpoint layer name for generated networks).
        in_channels: channels the layer reads (filled by generated networks; None when parsed).
        out_channels: channels the layer writes (as above).
        in_dims: spatial input dims ``(H, W)`` or ``(L,)`` (as above).
        nodes: the ONNX nodes the layer came from (generated networks).
    """

    op: str
    kernel_size: tuple[int, ...] = (3, 3)
    pad: int = 1
    pool: str | None = None
    pool_size: tuple[int, int] = (1, 1)
    pool_stride: tuple[int, int] = (1, 1)
    activation: str | None = None
    flatten: bool = False
    output_width: int = 8
    quantization: int | None = None
    output_shift: int | None = None
    processors: int = 1
    out_offset: int = 0
    data_format: str | None = None
    name: str | None = None
    in_channels: int | None = None
    out_channels: int | None = None
    in_dims: tuple[int, ...] | None = None
    nodes: tuple[str, ...] = ()

    @property
    def has_weights(self) -> bool:
        """Passthrough layers have no weights."""
        return self.op != "passthrough"


@dataclasses.dataclass(frozen=True)
class Network:
    """A parsed or generated network description."""

    arch: str
    dataset: str
    layers: tuple[HwLayer, ...]

    def weight_layers(self) -> list[int]:
        """Indices of the layers that take a checkpoint weight, in order."""
        return [i for i, layer in enumerate(self.layers) if layer.has_weights]


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise TargetError(f"{what}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.replace("_", "").replace(".", ""), 0)
        except ValueError:
            pass
    raise TargetError(f"{what}: expected an integer, got {value!r}")


def _pair(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise TargetError(f"{what}: expected an integer or [H, W], got {value!r}")
        return _int(value[0], what), _int(value[1], what)
    number = _int(value, what)
    return number, number


def _kernel(value: Any, op: str, what: str) -> tuple[int, ...]:
    if op == "conv1d":
        return (_int(value, what),)
    if isinstance(value, str) and "x" in value.lower():
        height, width = value.lower().split("x", 1)
        return _int(height, what), _int(width, what)
    size = _int(value, what)
    return size, size


def parse_layer(entry: Mapping[str, Any], index: int, source: str) -> HwLayer:
    """One YAML layer entry → :class:`HwLayer` (defaults of ``izer/yamlcfg.py``).

    Raises:
        TargetError: unknown or unsupported key or value, naming the file and layer.
    """
    where = f"{source}: layer {index}"
    known = {
        "processors",
        "out_offset",
        "op",
        "operation",
        "operator",
        "convolution",
        "kernel_size",
        "pad",
        "max_pool",
        "avg_pool",
        "pool_stride",
        "activate",
        "activation",
        "quantization",
        "output_shift",
        "output_width",
        "data_format",
        "flatten",
        "name",
        "bias_quantization",
        "stride",
        "dilation",
        "groups",
        "conv_groups",
    }
    for key in entry:
        if key in _UNSUPPORTED_KEYS:
            raise TargetError(
                f"{where}: key {key!r} is not supported by qcompiler's MAX78000 simulator"
            )
        if key not in known and key not in _PLACEMENT_KEYS:
            raise TargetError(f"{where}: unknown key {key!r}")
    if "processors" not in entry:
        raise TargetError(f"{where}: 'processors' is required")
    op_value = next(
        (entry[k] for k in ("op", "operation", "operator", "convolution") if k in entry), "conv2d"
    )
    op_name = str(op_value).lower()
    if op_name in _UNSUPPORTED_OPS:
        raise TargetError(
            f"{where}: op {op_value!r} is not supported (sequential conv/linear networks only)"
        )
    if op_name not in _OP_ALIASES:
        raise TargetError(f"{where}: unknown op {op_value!r}")
    op = _OP_ALIASES[op_name]
    default_kernel: tuple[int, ...] = {"conv2d": (3, 3), "conv1d": (9,)}.get(op, (1, 1))
    kernel = (
        _kernel(entry["kernel_size"], op, f"{where}: kernel_size")
        if "kernel_size" in entry
        else default_kernel
    )
    pool, pool_size = None, (1, 1)
    for kind in ("max", "avg"):
        if f"{kind}_pool" in entry:
            if pool is not None:
                raise TargetError(f"{where}: both max_pool and avg_pool")
            pool, pool_size = kind, _pair(entry[f"{kind}_pool"], f"{where}: {kind}_pool")
    stride = _pair(entry.get("pool_stride", 1), f"{where}: pool_stride")
    for key, neutral in (("stride", 1), ("dilation", 1), ("groups", 1), ("conv_groups", 1)):
        if key in entry and entry[key] not in (neutral, [neutral, neutral]):
            raise TargetError(f"{where}: {key} {entry[key]!r} is not supported (only {neutral})")
    if op == "conv1d":
        pool_size, stride = (pool_size[0], 1), (stride[0], 1)
    activation_value = entry.get("activate", entry.get("activation", "None"))
    activation_key = str(activation_value).lower()
    if activation_key not in _ACTIVATIONS:
        raise TargetError(f"{where}: activation {activation_value!r} (choose ReLU, Abs or None)")
    data_format = entry.get("data_format")
    if data_format is not None:
        data_format = {"hwc": "HWC", "little": "HWC", "chw": "CHW", "big": "CHW"}.get(
            str(data_format).lower()
        )
        if data_format is None:
            raise TargetError(f"{where}: data_format {entry['data_format']!r} (choose HWC or CHW)")
    width = _int(entry.get("output_width", 8), f"{where}: output_width")
    if width not in (8, 32):
        raise TargetError(f"{where}: output_width {width} (choose 8 or 32)")
    quantization = entry.get("quantization")
    return HwLayer(
        op=op,
        kernel_size=kernel,
        pad=_int(entry.get("pad", 1 if op in ("conv2d", "conv1d") else 0), f"{where}: pad"),
        pool=pool,
        pool_size=pool_size,
        pool_stride=stride,
        activation=_ACTIVATIONS[activation_key],
        flatten=bool(entry.get("flatten", False)),
        output_width=width,
        quantization=None if quantization is None else _int(quantization, f"{where}: quantization"),
        output_shift=None
        if entry.get("output_shift") is None
        else _int(entry["output_shift"], f"{where}: output_shift"),
        processors=_int(entry["processors"], f"{where}: processors"),
        out_offset=_int(entry.get("out_offset", 0), f"{where}: out_offset"),
        data_format=data_format,
        name=None if entry.get("name") is None else str(entry["name"]),
    )


def parse_network(document: Mapping[str, Any], source: str = "<yaml>") -> Network:
    """A loaded network YAML document → :class:`Network`.

    Raises:
        TargetError: missing or unknown global keys, or a bad layer.
    """
    if not isinstance(document, Mapping):
        raise TargetError(f"{source}: not a network description (expected a mapping)")
    for key in document:
        if key not in _GLOBAL_KEYS:
            raise TargetError(f"{source}: unknown global key {key!r}")
    for key in ("arch", "dataset", "layers"):
        if key not in document:
            raise TargetError(f"{source}: missing required key {key!r}")
    entries = document["layers"]
    if not isinstance(entries, list) or not entries:
        raise TargetError(f"{source}: 'layers' must be a non-empty list")
    layers = tuple(parse_layer(entry, i, source) for i, entry in enumerate(entries))
    return Network(str(document["arch"]), str(document["dataset"]), layers)


def load_network(path: str | Path) -> Network:
    """Read and parse a network YAML file.

    Raises:
        TargetError: unreadable file or invalid content, naming the file.
    """
    import yaml

    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TargetError(f"{path}: cannot read network YAML ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise TargetError(f"{path}: invalid YAML ({' '.join(str(exc).split())})") from None
    return parse_network(document, str(path))


# --- generation (max78000.md §3.3) ---------------------------------------------------------------


def processor_count(channels: int) -> int:
    """Processors used for ``channels`` channels: ``n = ceil(C/e)`` over ``e = ceil(C/64)`` passes."""
    passes = math.ceil(channels / 64)
    count = math.ceil(channels / passes)
    if channels > 64:
        count = min(4 * math.ceil(count / 4), 64)
    return count


def processor_map(channels: int, chw: bool = False) -> int:
    """The ``processors`` bit map: ``n`` low bits, or one processor per group of four for CHW."""
    if chw:
        return sum(1 << (4 * j) for j in range(channels))
    return (1 << processor_count(channels)) - 1


def yaml_entry(layer: HwLayer, last: bool) -> dict[str, Any]:
    """One layer as a YAML mapping, in the key order of §3.4."""
    entry: dict[str, Any] = {"name": layer.name, "processors": f"0x{layer.processors:016x}"}
    if layer.data_format is not None:
        entry["data_format"] = layer.data_format
    if layer.pool is not None:
        size = layer.pool_size if layer.op != "conv1d" else (layer.pool_size[0], 1)
        entry[f"{layer.pool}_pool"] = (
            size[0] if size[0] == size[1] or layer.op == "conv1d" else list(size)
        )
    if layer.pool is not None or layer.pool_stride != (1, 1):
        stride = layer.pool_stride
        entry["pool_stride"] = (
            stride[0] if stride[0] == stride[1] or layer.op == "conv1d" else list(stride)
        )
    entry["op"] = layer.op
    if layer.op == "conv2d":
        entry["kernel_size"] = f"{layer.kernel_size[0]}x{layer.kernel_size[1]}"
        entry["pad"] = layer.pad
    elif layer.op == "conv1d":
        entry["kernel_size"] = layer.kernel_size[0]
        entry["pad"] = layer.pad
    if layer.flatten:
        entry["flatten"] = True
    if layer.has_weights:
        entry["activate"] = layer.activation or "None"
    if last:
        entry["output_width"] = layer.output_width
    if layer.has_weights and layer.quantization is not None:
        entry["quantization"] = layer.quantization
    entry["out_offset"] = f"0x{layer.out_offset:04x}"
    return entry


def network_yaml(network: Network) -> str:
    """The YAML text of a generated network (one flow-style mapping per layer, as in §3.4)."""
    import yaml

    lines = [f"arch: {network.arch}", f"dataset: {network.dataset}", "layers:"]
    for i, layer in enumerate(network.layers):
        entry = yaml_entry(layer, last=i == len(network.layers) - 1)
        text = yaml.safe_dump(entry, default_flow_style=True, sort_keys=False, width=1000).strip()
        # Hex strings stay quoted for processors; offsets are plain hex numbers like upstream's files.
        text = text.replace(
            f"out_offset: '0x{layer.out_offset:04x}'", f"out_offset: 0x{layer.out_offset:04x}"
        )
        lines.append(f"  - {text}")
    return "\n".join(lines) + "\n"


def layer_names(layers: Sequence[HwLayer]) -> list[str]:
    """Names for the checkpoint: the layer's name or ``lNN_<op>``."""
    return [layer.name or f"l{i:02d}_{layer.op}" for i, layer in enumerate(layers)]
