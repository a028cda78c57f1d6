"""Writing your own pass: keep the first and last layers at 8 bits, then compile.

A pass is a frozen dataclass subclassing ``onnx_ir.passes.InPlacePass``; its fields are its
configuration (and its repr, recorded in the model's provenance). This one runs after the
allocator and overrides its choice for the first and last quantizable layers, a common rule
of thumb: they are small and sensitive. The fixed-point target then emits what it says.

Run: ``.venv/bin/python examples/pipelines/custom_pass.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.api import validate_outputs
from qcompiler.data import load_dataset
from qcompiler.graph import const_array, values_by_name
from qcompiler.ir import load_normalized
from qcompiler.passes import AllocateBitsPass, CalibratePass, ProfileErrorPass
from qcompiler.passes.detect_layers import quantizable_nodes
from qcompiler.passes.pipelines import canonical_pipeline
from qcompiler.pipeline import run_pipeline
from qcompiler.candidates import candidate_set
from qcompiler.targets import TargetConfig, get_target

DIGITS = Path(__file__).resolve().parents[1] / "digits"


@dataclasses.dataclass(frozen=True)
class PinEdgeLayersPass(ir.passes.InPlacePass):
    """Give the first and last quantizable layers ``bits``-bit weights (overriding the allocator).

    Attributes:
        bits: the word length of the edge layers.
    """

    bits: int = 8

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = quantizable_nodes(model)
        values = values_by_name(model.graph)
        for _, layer in (layers[0], layers[-1]):
            size = const_array(values[layer.weight]).size
            ann.set(values[layer.weight], ann.BitWidth(candidate=f"fixed:{self.bits}", kind="fixed", bits=self.bits,
                                                      rate=float(self.bits * size), distortion=0.0, method="pinned"))
        return ir.passes.PassResult(model, modified=True)


def main() -> dict[str, object]:
    """Allocate 3 bits per weight on average, pin the edge layers to 8 bits, emit fixed point."""
    model = load_normalized(DIGITS / "digits_cnn.onnx")
    float_model = model.clone()
    calib = DIGITS / "calib.npz"
    target = get_target("fixed-point")
    config = TargetConfig()
    passes = [
        *canonical_pipeline(),
        CalibratePass(data=calib, show_progress=False),
        ProfileErrorPass(data=calib, candidates=tuple(candidate_set(bits=(2, 3, 4, 8), kinds=("fixed",))),
                         tensors="weights", show_progress=False),
        AllocateBitsPass(avg_bits=3.0, legal_bits=(2, 3, 4, 8)),
        PinEdgeLayersPass(bits=8),
        *target.passes(config),
    ]
    result = run_pipeline(model, passes)
    bits = [ann.require(values_by_name(model.graph)[layer.weight], ann.FixedPoint).wl
            for _, layer in quantizable_nodes(model)]
    metrics = validate_outputs(float_model, target.simulate(result.model), load_dataset(DIGITS / "eval.npz", model))
    print("weight word lengths:", bits)
    print("provenance:", [entry["pass"] for entry in ann.require(model, ann.Provenance).entries][-3:])
    print(f"top-1 float {metrics['float']['top1']:.4f}, fixed point {metrics['simulated']['top1']:.4f}")
    return {"bits": bits, "metrics": metrics}


if __name__ == "__main__":
    main()
