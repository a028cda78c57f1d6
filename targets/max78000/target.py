"""The ``max78000`` target: legalise, rescale to Q7, quantize, emit an ai8xize-ready package.

Artifacts (max78000.md §7): ``<arch>.pth.tar`` (checkpoint), ``<arch>.yaml`` (network),
``sample_<dataset>.npy`` and ``kat-<arch>.npy`` (known answer), ``<arch>.sim.onnx`` (the §5.3
integer simulation ONNX), ``model.sim.onnx`` (the same with float input conversion and logit
scaling, what validation runs) and ``<arch>.layers.json`` (layer names ↔ ONNX nodes, λ, S).
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.data import ArrayDataset
from qcompiler.errors import AnnotationError, DataError, TargetError
from qcompiler.fsutil import write_bytes, write_json, write_npy
from qcompiler.graph import attr, nodes_by_name, values_by_name, weight_count
from qcompiler.ir import save
from qcompiler.passes.calibrate import range_key
from qcompiler.passes.detect_layers import quantizable_nodes
from qcompiler.targets.base import Artifact, TargetConfig
from qcompiler.targets.max78000 import constraints
from qcompiler.targets.max78000.checkpoint import require_torch, checkpoint_bytes
from qcompiler.targets.max78000.legalize import LegalLayer, legalize
from qcompiler.targets.max78000.network import HwLayer, Network, network_yaml
from qcompiler.targets.max78000.onnx_model import build_simulation, exactness_bound
from qcompiler.targets.max78000.rescale import (
    THRESHOLDS,
    QuantizedLayer,
    layer_scale,
    quantize_layer,
    shift_of_step,
    weight_step,
    scales,
)
from qcompiler.targets.max78000.simulator import LayerParams, simulate

LEGAL_WEIGHT_BITS = (1, 2, 4, 8)
SIMULATION_FILE = "model.sim.onnx"


@dataclasses.dataclass(frozen=True)
class Max78000Layer(ann.Annotation):
    """On a Conv/Gemm/MatMul node: its MAX78000 layer, bits and Q7 scales.

    Attributes:
        index: hardware layer index.
        name: checkpoint layer name.
        bits: weight bits.
        lambda_in: ``λ_{l−1}``: the float value of input code 128.
        lambda_out: ``λ_l`` (1 for a wide last layer).
    """

    KIND: ClassVar[str] = "max78000_layer"
    index: int
    name: str
    bits: int
    lambda_in: float
    lambda_out: float


@dataclasses.dataclass(frozen=True)
class Max78000Network(ann.Annotation):
    """On the model: the network-level MAX78000 choices.

    Attributes:
        arch: the checkpoint/YAML ``arch``.
        dataset: the YAML ``dataset``.
        lambda_input: ``λ_0``: sample conversion ``x_0 = clamp(round(128·a/λ_0), −128, 127)``.
        shift_quantile: quantile of ``|[W', B']|`` that sets each layer's shift.
        weight_threshold: ``auto``, ``max`` (quantize.py's rule) or ``mse`` (least squared weight error).
    """

    KIND: ClassVar[str] = "max78000_network"
    arch: str
    dataset: str
    lambda_input: float
    shift_quantile: float
    weight_threshold: str = "auto"


def sanitize_arch(name: str) -> str:
    """A lower-case identifier usable as ``arch`` and in file names."""
    text = re.sub(r"[^a-z0-9_]", "_", name.lower()).strip("_")
    return text or "qcnet"


@dataclasses.dataclass(frozen=True)
class Max78000QuantizePass(ir.passes.InPlacePass):
    """Legalise, choose per-layer Q7 scales from calibration and annotate bits and scales.

    Attributes:
        weight_bits: bits of layers without a :class:`~qcompiler.annotations.BitWidth` allocation.
        shift_quantile: quantile of ``|[W', B']|`` defining each layer's shift (1.0 = max).
        range_method: calibrated range for ``λ`` (``minmax`` or a CalibratePass range key method).
        percentile: percentile of the ``percentile`` method.
        ai8x_input: the model takes ai8x-normalised input (``λ_0 = 1``).
        pot_scales: round every ``λ`` up to a power of two.
        arch: the ``arch`` written to the checkpoint and YAML.
        dataset: the YAML ``dataset`` (default: ``arch``).
        weight_threshold: ``max`` is quantize.py's rule (no clipping); ``mse`` picks each layer's
            bit shift with the least squared weight error; ``auto`` (default) is ``max`` at 8 bits
            and ``mse`` below.
    """

    weight_bits: int = 8
    shift_quantile: float = 1.0
    range_method: str = "minmax"
    percentile: float = 99.99
    ai8x_input: bool = False
    pot_scales: bool = False
    arch: str = "qcnet"
    dataset: str | None = None
    weight_threshold: str = "auto"

    def __post_init__(self) -> None:
        if self.weight_threshold not in THRESHOLDS:
            raise TargetError(
                f"max78000: weight threshold {self.weight_threshold!r} (choose {', '.join(THRESHOLDS)})"
            )
        if self.weight_bits not in LEGAL_WEIGHT_BITS:
            raise TargetError(
                f"max78000: weight bits {self.weight_bits} not in 1, 2, 4, 8 (rule §4.18)"
            )
        if not 0.0 < self.shift_quantile <= 1.0:
            raise TargetError(f"max78000: shift quantile {self.shift_quantile} must be in (0, 1]")

    def _range(self, stats: ann.TensorStats) -> float:
        if self.range_method == "minmax":
            return stats.absmax
        key = range_key(self.range_method, 8, self.percentile)
        return dict(stats.ranges).get(key, stats.absmax)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = legalize(model)
        values, nodes = values_by_name(model.graph), nodes_by_name(model.graph)
        ranges = []
        for layer in layers:
            stats = ann.get(values[layer.output], ann.TensorStats) if layer.weight_node else None
            if (
                layer.weight_node
                and stats is None
                and layer.clip_max is None
                and layer is not layers[-1]
            ):
                raise AnnotationError(
                    f"value {layer.output!r} has no calibration statistics (run CalibratePass "
                    "with post_activation=True)"
                )
            ranges.append(None if stats is None else self._range(stats))
        lambda_input = 1.0 if self.ai8x_input else self._input_scale(model, layers, values)
        bits = [
            self._bits(nodes[layer.weight_node], values) if layer.weight_node else None
            for layer in layers
        ]
        for i, (layer, (lam_in, lam_out)) in enumerate(
            zip(layers, scales(layers, lambda_input, ranges, self.pot_scales))
        ):
            if layer.weight_node is not None:
                ann.set(
                    nodes[layer.weight_node],
                    Max78000Layer(i, layer.hw.name, bits[i], lam_in, lam_out),
                )
        ann.set(
            model,
            Max78000Network(
                self.arch,
                self.dataset or self.arch,
                lambda_input,
                self.shift_quantile,
                self.weight_threshold,
            ),
        )
        compiled = compile_network(model)  # checks every hardware constraint now, before anything is written
        annotate_weight_grids(model, compiled)
        annotate_activation_grids(model, compiled)
        return ir.passes.PassResult(model, True)

    def _input_scale(
        self, model: ir.Model, layers: Sequence[LegalLayer], values: dict[str, ir.Value]
    ) -> float:
        candidates = [model.graph.inputs[0]] + [
            values[layer.activation_input] for _, layer in quantizable_nodes(model)[:1]
        ]
        for value in candidates:
            stats = ann.get(value, ann.TensorStats)
            if stats is not None:
                return layer_scale(self._range(stats), power_of_two=self.pot_scales)
        raise AnnotationError(
            "the model input has no calibration statistics (run CalibratePass first)"
        )

    def _bits(self, node: ir.Node, values: dict[str, ir.Value]) -> int:
        layer = ann.get(node, ann.QuantizableLayer)
        chosen = ann.get(values[layer.weight], ann.BitWidth) if layer is not None else None
        if chosen is None:
            return self.weight_bits
        if chosen.bits not in LEGAL_WEIGHT_BITS:
            raise TargetError(
                f"max78000: node {node.name!r}: allocated {chosen.bits} bits (rule §4.18: 1, 2, 4, 8)"
            )
        return chosen.bits


def annotate_weight_grids(model: ir.Model, compiled: CompiledNetwork) -> None:
    """Write each weight's and bias's MAX78000 grid (:class:`~qcompiler.annotations.WeightGrid`),
    so that GPFQ and fine-tuning choose codes on it; :func:`compile_network` then keeps that
    grid's bit shift. A bias code ``b_hw`` (int8) adds ``128·b_hw`` accumulator units, i.e.
    ``b_hw·step·λ_in`` in float."""
    nodes = nodes_by_name(model.graph)
    for layer, quantized in zip(compiled.legal, compiled.quantized):
        if quantized is None:
            continue
        bits = quantized.params.bits
        step = weight_step(bits, quantized.lambda_in, quantized.lambda_out, quantized.bit_shift)
        ann.set(nodes[layer.weight_node].inputs[1], ann.WeightGrid(
            bits=bits, q_min=-(1 << (bits - 1)), q_max=(1 << (bits - 1)) - 1, scales=(step,), axis=None,
            target="max78000"))
        bias = _bias_value(nodes, layer)
        if bias is not None:
            ann.set(bias, ann.WeightGrid(bits=8, q_min=-128, q_max=127, scales=(step * quantized.lambda_in,),
                                         axis=None, target="max78000"))


def _bias_value(nodes: dict[str, ir.Node], layer: LegalLayer) -> ir.Value | None:
    """The float bias initializer of a weight layer (Conv/Gemm input 2, or MatMul's Add)."""
    weight_node = nodes[layer.weight_node]
    if len(weight_node.inputs) > 2 and weight_node.inputs[2] is not None:
        return weight_node.inputs[2]
    for name in layer.hw.nodes:
        if nodes[name].op_type == "Add":
            return next((v for v in nodes[name].inputs if v is not None and v.is_initializer()), None)
    return None


def annotate_activation_grids(model: ir.Model, compiled: CompiledNetwork) -> None:
    """Write the Q7 grid of every value the hardware holds as int8 codes
    (:class:`~qcompiler.annotations.ActivationGrid`), so that fine-tuning computes exactly
    what the accelerator computes (max78000.md §5.1):

    - the model input: ``round_half_even(128·a/λ_0)`` clamped to int8 (§6.4);
    - each weight layer's output before its activation: the accumulator shifted right by
      ``7 − S`` bits, rounded half up, clamped to int8 (a wide last layer stays unquantized);
    - each average pooling: the window sum divided by the window size, truncated toward zero.
    """
    nodes = nodes_by_name(model.graph)
    wide = compiled.network.layers[-1].output_width == 32
    ann.set(model.graph.inputs[0], _q7(compiled.lambda_input, "half_even", 0))
    current = compiled.lambda_input
    for i, (layer, quantized) in enumerate(zip(compiled.legal, compiled.quantized)):
        pool = nodes[layer.hw.nodes[0]] if layer.hw.pool is not None else None
        if pool is not None and pool.op_type in ("AveragePool", "GlobalAveragePool"):
            ann.set(pool.outputs[0], _q7(current, "toward_zero", _window(pool)))
        if quantized is None:
            continue
        current = quantized.lambda_out
        if wide and i == len(compiled.legal) - 1:
            continue
        last = nodes[layer.hw.nodes[-1]]
        before = last.inputs[0] if layer.hw.activation is not None else last.outputs[0]
        k = 7 - quantized.params.shift
        ann.set(before, _q7(current, "half_up", 1 << k if k > 0 else 1))


def _q7(lam: float, rounding: str, lattice: int) -> ann.ActivationGrid:
    return ann.ActivationGrid(scale=lam / 128.0, q_min=-128, q_max=127, rounding=rounding, lattice=lattice,
                              target="max78000")


def _window(pool: ir.Node) -> int:
    """The number of values an average pooling sums."""
    if pool.op_type == "GlobalAveragePool":
        return int(np.prod([int(d) for d in list(pool.inputs[0].shape)[2:]]))
    return int(np.prod(attr(pool, "kernel_shape")))


@dataclasses.dataclass(frozen=True)
class CompiledNetwork:
    """Everything emission needs, recomputed deterministically from the annotated model."""

    network: Network
    legal: tuple[LegalLayer, ...]
    quantized: tuple[QuantizedLayer | None, ...]
    lambda_input: float
    memory: dict[str, Any]

    @property
    def params(self) -> list[LayerParams | None]:
        """Per-layer integer parameters (None for passthrough)."""
        return [q.params if q is not None else None for q in self.quantized]

    def output_scale(self) -> float:
        """Float value of one output unit: ``2^(s−b−6)`` for a wide last layer, else ``λ_L/128``."""
        last = self.quantized[-1]
        if self.network.layers[-1].output_width == 32 and last is not None:
            return 2.0 ** (last.output_shift - last.params.bits - 6)
        lam = last.lambda_out if last is not None else self.lambda_input
        return lam / 128.0


def compile_network(model: ir.Model) -> CompiledNetwork:
    """Legalise, place, quantize and check an annotated model.

    Raises:
        AnnotationError: :class:`Max78000QuantizePass` has not run.
        TargetError: a hardware constraint is violated (one line naming layer and rule).
    """
    info = ann.require(model, Max78000Network, where="the max78000 target")
    nodes = nodes_by_name(model.graph)
    legal = legalize(model)
    quantized: list[QuantizedLayer | None] = []
    hw_layers: list[HwLayer] = []
    for layer in legal:
        if layer.weight_node is None:
            quantized.append(None)
            hw_layers.append(layer.hw)
            continue
        choice = ann.require(nodes[layer.weight_node], Max78000Layer, where="the max78000 target")
        rewritten = ann.get(nodes[layer.weight_node].inputs[1], ann.IntegerWeights)
        fixed_shift = None
        if rewritten is not None and rewritten.grid == "max78000":
            # the weights already lie on this grid (GPFQ): keep its shift, do not re-derive it
            fixed_shift = shift_of_step(choice.bits, choice.lambda_in, choice.lambda_out, rewritten.scales[0])
        quantized.append(
            quantize_layer(
                layer,
                choice.bits,
                choice.lambda_in,
                choice.lambda_out,
                info.shift_quantile,
                threshold_rule=info.weight_threshold,
                bit_shift=fixed_shift,
            )
        )
        hw_layers.append(dataclasses.replace(layer.hw, quantization=choice.bits))
    placed = constraints.place(hw_layers)
    memory = constraints.check(
        placed,
        [q.params.bits if q else None for q in quantized],
        [q.params.shift if q else None for q in quantized],
        [bool(q and q.params.bias is not None) for q in quantized],
    )
    network = Network(info.arch, info.dataset, tuple(placed))
    return CompiledNetwork(network, tuple(legal), tuple(quantized), info.lambda_input, memory)


def state_dict(compiled: CompiledNetwork) -> OrderedDict[str, Any]:
    """The checkpoint state_dict of §2.5, weight layers in execution order."""
    torch = require_torch()
    out: OrderedDict[str, Any] = OrderedDict()
    for layer, q in zip(compiled.network.layers, compiled.quantized):
        if q is None:
            continue
        name, bits = layer.name, float(q.params.bits)
        out[f"{name}.output_shift"] = torch.tensor([float(q.output_shift)])
        out[f"{name}.weight_bits"] = torch.tensor([bits])
        out[f"{name}.bias_bits"] = torch.tensor([bits])
        out[f"{name}.quantize_activation"] = torch.tensor([1.0])
        out[f"{name}.adjust_output_shift"] = torch.tensor([0.0])
        out[f"{name}.op.weight"] = torch.from_numpy(q.params.weights.astype(np.float32))
        if q.stored_bias is not None:
            out[f"{name}.op.bias"] = torch.from_numpy(np.asarray(q.stored_bias, dtype=np.float32))
    return out


def convert_input(batch: np.ndarray, lambda_input: float) -> np.ndarray:
    """§6.4: ``x_0 = clamp(round(128·a/λ_0), −128, 127)`` as int64 (round half to even)."""
    return np.clip(np.rint(batch.astype(np.float64) * (128.0 / lambda_input)), -128, 127).astype(
        np.int64
    )


class Max78000Target:
    """The ``max78000`` target."""

    name: ClassVar[str] = "max78000"
    legal_weight_bits: ClassVar[tuple[int, ...]] = LEGAL_WEIGHT_BITS
    legal_activation_bits: ClassVar[tuple[int, ...]] = (8,)
    legal_kinds: ClassVar[tuple[str, ...]] = ("fixed",)
    #: λ_l comes from the post-activation output of each layer.
    calibrate_post_activation: ClassVar[bool] = True
    #: The default allocation budget when 8-bit weights do not fit (64 × 768 × 9 B = 432 KiB).
    weight_memory_bytes: ClassVar[int] = constraints.WEIGHT_MEMORY_BYTES

    def passes(self, config: TargetConfig) -> Sequence[ir.passes.PassBase]:
        """Legalise, choose scales and bits, check the hardware constraints."""
        return [
            Max78000QuantizePass(
                weight_bits=config.weight_bits,
                range_method=config.range_method,
                percentile=config.percentile,
                arch=sanitize_arch(config.model_name or "qcnet"),
            )
        ]

    def check_model(self, model: ir.Model, config: TargetConfig) -> None:
        """The canonical model legalises onto hardware layers, and its weights fit the weight
        memory at the smallest legal width (every weight takes at least that many bits, so a
        model over this bound can never fit)."""
        legalize(model)
        count, smallest = weight_count(model), min(LEGAL_WEIGHT_BITS)
        if count * smallest > 8 * self.weight_memory_bytes:
            raise TargetError(
                f"max78000: the model has {count:,} weights; even at {smallest} bit each they take "
                f"{count * smallest // 8:,} bytes, more than the {self.weight_memory_bytes:,}-byte weight memory "
                "(§4 rule 19: kernel memory)"
            )

    def validate(self, model: ir.Model) -> None:
        """Re-check legality and every hardware constraint on the annotated model."""
        compile_network(model)

    def simulate(self, model: ir.Model) -> ir.Model:
        """The float-I/O simulation ONNX (input conversion, §5.3 arithmetic, logit scaling)."""
        compiled = compile_network(model)
        source = model.graph.inputs[0]
        shape = [int(d) for d in list(source.shape)[1:]]
        return build_simulation(
            compiled.network.layers,
            compiled.params,
            shape,
            source.name,
            model.graph.outputs[0].name,
            input_scale=128.0 / compiled.lambda_input,
            output_scale=compiled.output_scale(),
        )

    def emit(self, model: ir.Model, out_dir: Path, data: ArrayDataset | None = None) -> Artifact:
        """Write the checkpoint, YAML, sample + KAT, simulation ONNX files and the layer sidecar."""
        if data is None or data.num_samples == 0:
            raise DataError(
                "max78000: emitting the known-answer sample needs data (--calib or --eval)"
            )
        compiled = compile_network(model)
        arch, dataset = compiled.network.arch, compiled.network.dataset
        source = model.graph.inputs[0]
        first = next(iter(data.batches(1)))[source.name][0]
        sample = convert_input(first, compiled.lambda_input)
        if sample.ndim == 1:  # §4 row 24: a feature vector is written as (C, 1, 1)
            sample = sample.reshape(-1, 1, 1)
        kat = np.asarray(simulate(compiled.network, compiled.params, sample))
        integer_model = build_simulation(compiled.network.layers, compiled.params, sample.shape)
        simulation = self.simulate(model)
        files = {
            "checkpoint": f"{arch}.pth.tar",
            "yaml": f"{arch}.yaml",
            "sample": f"sample_{dataset.lower()}.npy",
            "kat": f"kat-{arch}.npy",
            "integer_onnx": f"{arch}.sim.onnx",
            "simulation_onnx": SIMULATION_FILE,
            "layers": f"{arch}.layers.json",
        }
        checkpoint = {
            "epoch": 0,
            "arch": arch,
            "state_dict": state_dict(compiled),
            "extras": {"clipping_method": "MAX_BIT_SHIFT", "producer": "qcompiler"},
        }
        write_bytes(out_dir / files["checkpoint"], checkpoint_bytes(checkpoint))
        write_bytes(out_dir / files["yaml"], network_yaml(compiled.network).encode())
        write_npy(out_dir / files["sample"], sample)
        write_npy(out_dir / files["kat"], kat.astype(np.int64))
        save(integer_model, out_dir / files["integer_onnx"])
        save(simulation, out_dir / files["simulation_onnx"])
        details = target_report(compiled, files)
        per_layer = layer_fidelity(model, compiled, data)
        for row, extra in zip(details["layers"], per_layer):
            row.update(extra)
        write_json(out_dir / files["layers"], details)
        return Artifact(
            files=tuple(sorted(files.values())), simulation_model=simulation, report=details
        )


#: Samples used for the per-layer saturation and SQNR of the report (the numpy simulator is the reference).
FIDELITY_SAMPLES = 64


def layer_fidelity(
    model: ir.Model, compiled: CompiledNetwork, data: ArrayDataset
) -> list[dict[str, Any]]:
    """Per layer (§6.6): output SQNR of the integer simulation against the float model, and the
    fraction of int8 outputs at the clamp (127 or −128), on up to :data:`FIDELITY_SAMPLES` samples."""
    from qcompiler.metrics import sqnr_db
    from qcompiler.runtime import Runner

    source = model.graph.inputs[0].name
    batch = next(iter(data.batches(FIDELITY_SAMPLES)))
    names = [layer.output for layer in compiled.legal]
    graph_outputs = {v.name for v in model.graph.outputs}
    floats = Runner(model, [n for n in names if n not in graph_outputs]).run(batch, names)
    integers = [
        simulate(compiled.network, compiled.params, x, keep_all=True)
        for x in convert_input(batch[source], compiled.lambda_input)
    ]
    rows = []
    for i, (layer, q) in enumerate(zip(compiled.network.layers, compiled.quantized)):
        ints = np.stack([np.asarray(sample[i]) for sample in integers]).astype(np.float64)
        reference = np.asarray(floats[names[i]], dtype=np.float64)
        if layer.output_width == 32:
            scale = compiled.output_scale()
        else:
            scale = (q.lambda_out if q is not None else _scale_before(compiled, i)) / 128.0
        approx = (ints * scale).reshape(reference.shape)
        saturated = (
            None if layer.output_width == 32 else float(np.mean((ints >= 127) | (ints <= -128)))
        )
        rows.append(
            {"sqnr_db": _finite(sqnr_db(reference, approx)), "saturated_fraction": saturated}
        )
    return rows


def _scale_before(compiled: CompiledNetwork, index: int) -> float:
    for q in reversed(compiled.quantized[:index]):
        if q is not None:
            return q.lambda_out
    return compiled.lambda_input


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def target_report(compiled: CompiledNetwork, files: dict[str, str]) -> dict[str, Any]:
    """Per-layer facts (§6.6), the memory map and the input/output conversions."""
    rows = []
    for i, (layer, q) in enumerate(zip(compiled.network.layers, compiled.quantized)):
        row: dict[str, Any] = {
            "index": i,
            "name": layer.name,
            "onnx_nodes": list(layer.nodes),
            "op": layer.op,
            "in_channels": layer.in_channels,
            "out_channels": layer.out_channels,
            "in_dims": list(layer.in_dims or ()),
            "pool": layer.pool,
            "processors": f"0x{layer.processors:016x}",
            "out_offset": layer.out_offset,
            "output_width": layer.output_width,
            "activation": layer.activation,
        }
        if q is not None:
            row.update(
                bits=q.params.bits,
                lambda_in=q.lambda_in,
                lambda_out=q.lambda_out,
                output_shift=q.output_shift,
                bit_shift=q.bit_shift,
                shift=q.params.shift,
                clamped_weights=q.clamped_weights,
                clamped_biases=q.clamped_biases,
                shift_clamped=q.shift_clamped,
                weight_bytes=int(np.ceil(q.params.weights.size * q.params.bits / 8)),
                kernel_words=constraints.kernel_words(layer, q.params.bits),
            )
        rows.append(row)
    return {
        "arch": compiled.network.arch,
        "dataset": compiled.network.dataset,
        "files": files,
        "input_conversion": {
            "lambda_0": compiled.lambda_input,
            "formula": f"x0 = clamp(round(128 * a / {compiled.lambda_input!r}), -128, 127)",
        },
        "output_scale": compiled.output_scale(),
        "layers": rows,
        "memory": compiled.memory,
        "weight_bytes": sum(r.get("weight_bytes", 0) for r in rows),
        "ort_exactness_risk_layers": exactness_bound(compiled.params),
    }
