"""Seed 000's allocation files: ``pareto_condition_inputs.txt`` and ``bit_allocation_{10·b̄}.txt``.

``pareto_condition_inputs.txt`` (algorithms.md §2.2) holds the dead-zone rate–distortion curves
of every tensor, weights first, then activations: for each tensor a line with its point count
``m``, then ``m`` lines ``layer dz L rate D``: the tensor's index among its kind (0-based), the
dead-zone ratio in percent (−1 for activations, whose points are the ratio-0 dead zones, as the
seed's activation codebooks are), the level count, the ``log2`` rate N·log2 L
in bits, and the distortion. ``bit_allocation_{10·b̄}.txt`` holds the chosen ``dz L`` of every
tensor, one line each, in the same order.

qcompiler writes the first from a profile (``qcompile profile --export-pareto-inputs``), reads
it back (or the seed's own) and allocates it for a list of budgets (``qcompile allocate``), so a
seed-000 user can move in either direction at step 5 of the seed's pipeline.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.allocation import Allocation, AllocationError, Curve, allocate
from qcompiler.candidates import MAX_LEVELS, NOT_QUANTIZED, NOT_QUANTIZED_LEVELS, Candidate, Fitted, deadzone_levels, parse_candidate
from qcompiler.errors import DataError
from qcompiler.graph import static_size, values_by_name
from qcompiler.passes.detect_layers import layer_tensors
from qcompiler.data import iter_feeds
from qcompiler.passes.measure_allocation import chosen_quantizers, joint_outputs, squared_error

INPUTS_NAME = "pareto_condition_inputs.txt"


@dataclasses.dataclass(frozen=True)
class SeedPoint:
    """One ``layer dz L rate D`` line.

    Attributes:
        dz: dead-zone ratio in percent (−1 for activations).
        levels: level count L.
        rate: ``log2`` rate N·log2 L in bits.
        distortion: the distortion D.
    """

    dz: float
    levels: int
    rate: float
    distortion: float

    @property
    def candidate(self) -> Candidate | None:
        """The dead zone this point stands for (activations: ratio 0, as in the seed); None for
        the seed's "not quantized" (a level count above 65536: it writes L = ∞ as 100000000)."""
        if self.levels > MAX_LEVELS:
            return None
        return deadzone_levels(self.levels, 0.0 if self.dz < 0 else self.dz / 100.0)


@dataclasses.dataclass(frozen=True)
class SeedTensor:
    """One tensor's curve.

    Attributes:
        layer: index among the tensors of its kind (0-based).
        activation: an activation (dz −1) rather than a weight.
        points: its points, in file order.
        name: the value's name, when known (not stored in the file).
    """

    layer: int
    activation: bool
    points: tuple[SeedPoint, ...]
    name: str = ""

    @property
    def elements(self) -> float:
        """N (per sample for activations), from the rates: rate = N·log2 L."""
        return self.points[0].rate / math.log2(self.points[0].levels)


def _number(value: float) -> str:
    """Shortest text that reads back to the same float (integers without a point)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def profiles_to_seed(model: ir.Model, profiles: Mapping[str, ann.ErrorProfile] | None = None) -> list[SeedTensor]:
    """The dead-zone points of every profiled tensor: weights in layer order, then activations.

    Args:
        model: the profiled model.
        profiles: the profiles by value name (default: the model's ErrorProfile annotations).

    Raises:
        DataError: a profiled tensor without dead-zone candidates or without ``log2`` rates.
    """
    values = values_by_name(model.graph)
    if profiles is None:
        profiles = {n: p for n, v in values.items() if (p := ann.get(v, ann.ErrorProfile)) is not None}
    weights, activations = ([n for n in names if n in profiles] for names in layer_tensors(model))
    out = []
    for kind_index, names in ((0, weights), (1, activations)):
        for index, name in enumerate(names):
            profile = profiles[name]
            if len(profile.rate_log2) != len(profile.candidates):
                raise DataError(f"{name}: its profile has no log2 rates: profile again")
            points = []
            for label, rate, distortion in zip(profile.candidates, profile.rate_log2, profile.distortion):
                candidate = parse_candidate(label)
                dz = -1.0 if kind_index else candidate.ratio * 100.0
                # activations take ratio-0 codebooks in the seed; their dz is written as -1
                if candidate.kind == "deadzone" and not (kind_index and candidate.ratio):
                    points.append(SeedPoint(dz, candidate.level_count, rate, distortion))
                elif candidate.kind == NOT_QUANTIZED:  # the seed's L = 100000000
                    points.append(SeedPoint(dz, NOT_QUANTIZED_LEVELS, rate, distortion))
            if not points:
                need = "ratio-0 dead zone (add 0 to --deadzone-ratios)" if kind_index else "dead-zone candidate"
                raise DataError(f"{name}: no {need} was profiled (seed 000's files hold dead zones only)")
            out.append(SeedTensor(index, bool(kind_index), tuple(points), name))
    return out


def format_pareto_inputs(tensors: Iterable[SeedTensor]) -> str:
    """The text of ``pareto_condition_inputs.txt``."""
    lines = []
    for t in tensors:
        lines.append(str(len(t.points)))
        lines += [f"{t.layer} {_number(p.dz)} {p.levels} {_number(p.rate)} {_number(p.distortion)}" for p in t.points]
    return "\n".join(lines) + "\n"


def read_pareto_inputs(path: str | Path) -> list[SeedTensor]:
    """Read a ``pareto_condition_inputs.txt`` (qcompiler's or the seed's).

    Raises:
        DataError: naming the file and line, for a missing file, a malformed or truncated line,
            a tensor whose rates disagree on N, or a weight after an activation.
    """
    path = Path(path)
    try:
        rows = path.read_text().split("\n")
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file (pareto_condition_inputs.txt holds numbers)") from None
    tensors: list[SeedTensor] = []
    i = 0
    while i < len(rows):
        if not rows[i].strip():
            i += 1
            continue
        where = f"{path}:{i + 1}"
        m = _count(rows[i], where)
        block = [_point(rows[j] if j < len(rows) else "", f"{path}:{j + 1}") for j in range(i + 1, i + 1 + m)]
        activation = block[0][1].dz < 0
        if any((p.dz < 0) != activation for _, p in block):
            raise DataError(f"{where}: a tensor mixes weight and activation points (dz -1 marks activations)")
        if tensors and tensors[-1].activation and not activation:
            raise DataError(f"{where}: a weight after the activations (the file lists weights first)")
        tensor = SeedTensor(block[0][0], activation, tuple(p for _, p in block))
        _check_elements(tensor, where)
        tensors.append(tensor)
        i += 1 + m
    if not tensors:
        raise DataError(f"{path}: no tensor in the file")
    return tensors


def _count(text: str, where: str) -> int:
    try:
        m = int(text.strip())
    except ValueError:
        raise DataError(f"{where}: expected a point count, got {text.strip()!r}") from None
    if m < 1:
        raise DataError(f"{where}: a tensor needs at least one point, got {m}")
    return m


def _point(text: str, where: str) -> tuple[int, SeedPoint]:
    fields = text.split()
    if len(fields) != 5:
        raise DataError(f"{where}: expected 'layer dz L rate D', got {text.strip()!r}")
    try:
        layer, dz, levels, rate, distortion = int(fields[0]), float(fields[1]), int(fields[2]), float(fields[3]), float(fields[4])
    except ValueError:
        raise DataError(f"{where}: expected 'layer dz L rate D' numbers, got {text.strip()!r}") from None
    if levels < 2 or not (math.isfinite(rate) and math.isfinite(distortion)) or rate < 0 or distortion < 0:
        raise DataError(f"{where}: L must be >= 2 and rate, D finite and >= 0, got {text.strip()!r}")
    return layer, SeedPoint(dz, levels, rate, distortion)


def _check_elements(tensor: SeedTensor, where: str) -> None:
    n = tensor.elements
    for p in tensor.points:
        if not math.isclose(p.rate / math.log2(p.levels), n, rel_tol=1e-6):
            raise DataError(f"{where}: the rates disagree on N (rate = N·log2 L): {n:g} and {p.rate / math.log2(p.levels):g}")


def allocate_seed(tensors: Sequence[SeedTensor], avg_bits: float, method: str = "knapsack",
                  max_point_error: float | None = None) -> tuple[list[SeedPoint], Allocation]:
    """Choose one point per tensor for the budget ``avg_bits``·ΣN (the seed's B = b̄·total_num_data).

    Args:
        tensors: the curves.
        avg_bits: b̄, bits per element over every tensor's N.
        method: an allocator of :func:`qcompiler.allocation.allocate`.
        max_point_error: drop points with D above it first (the seed drops D > 1, Q000-7).

    Raises:
        DataError: a tensor left without points by ``max_point_error``.
        AllocationError: an impossible budget.
    """
    kept = []
    for t in tensors:
        points = [p for p in t.points if max_point_error is None or p.distortion <= max_point_error]
        if not points:
            kind = "activation" if t.activation else "weight"
            raise DataError(f"{kind} {t.layer}: every point has D > {max_point_error:g} (--max-point-error)")
        kept.append(points)
    curves = [Curve(tuple(p.rate for p in points), tuple(p.distortion for p in points), f"{t.layer}")
              for t, points in zip(tensors, kept)]
    budget = avg_bits * sum(t.elements for t in tensors)
    result = allocate(curves, budget, method)
    return [points[i] for points, i in zip(kept, result.choice)], result


def format_bit_allocation(choice: Sequence[SeedPoint]) -> str:
    """The text of ``bit_allocation_{10·b̄}.txt``: ``dz L`` per tensor, in file order."""
    return "".join(f"{_number(p.dz)} {p.levels}\n" for p in choice)


def bit_allocation_name(avg_bits: float) -> str:
    """``bit_allocation_15.txt`` for b̄ = 1.5 (the seed's naming, 10·b̄)."""
    return f"bit_allocation_{round(avg_bits * 10)}.txt"


def parse_budgets(text: str) -> list[float]:
    """``"1.5,2,3"`` or ``"1.5:16:0.1"`` (start:stop:step, stop included, the seed's list).

    Raises:
        DataError: malformed text, a step that is not positive, or a budget not above 0.
    """
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            budgets = [round(start + i * step, 10) for i in range(count)]
        else:
            budgets = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DataError(f"--avg-bits {text!r}: expected b1,b2,... or start:stop:step with step > 0") from None
    if not budgets or min(budgets) <= 0:
        raise DataError(f"--avg-bits {text!r}: budgets must be above 0 bits per element")
    return budgets


@dataclasses.dataclass(frozen=True)
class SeedEvaluation:
    """The model every allocation of a curve file is applied to and measured on (seed step 6).

    Attributes:
        model: the float model (.onnx) the curves were profiled on.
        calib: calibration data: the activations' dead zones are fitted on its reservoir.
        eval: data the allocated model is measured on (logit MSE against float, top-1 when it
            has labels); default ``calib``.
        batch_size: batch size.
    """

    model: str | Path
    calib: Any
    eval: Any = None
    batch_size: int = 64


def run_seed_allocation(inputs: str | Path, budgets: Sequence[float], out: str | Path, method: str = "knapsack",
                        max_point_error: float | None = None,
                        evaluation: SeedEvaluation | None = None) -> list[dict[str, float | str]]:
    """Seed 000's step 5 (and 6) from a curve file: one ``bit_allocation_{10·b̄}.txt`` per feasible
    budget and ``allocations.json`` (per budget: rate used per element, Σ D, the solver; or why it
    is infeasible) in ``out``. With ``evaluation``, every allocation is also applied to the model:
    its measured logit MSE (and top-1) go into ``allocations.json`` and its codebooks into
    ``codebooks_{10·b̄}.txt`` (``name dz L λ δ``).

    Raises:
        DataError: an unreadable curve file, or a file that does not fit the model.
        AllocationError: no budget is feasible.
    """
    from qcompiler.fsutil import atomic_dir, check_output_dir, write_bytes, write_json

    tensors = read_pareto_inputs(inputs)
    check_output_dir(out)
    evaluator = _Evaluator(evaluation, tensors, str(inputs)) if evaluation is not None else None
    elements = sum(t.elements for t in tensors)
    rows: list[dict[str, float | str]] = []
    solved = []
    for b in budgets:
        try:
            choice, result = allocate_seed(tensors, b, method, max_point_error)
        except AllocationError as exc:  # below the smallest candidates: reported, the others still run
            rows.append({"avg_bits": b, "error": str(exc)})
            continue
        row = {"avg_bits": b, "file": bit_allocation_name(b), "rate_per_element": result.rate / elements,
               "distortion": result.distortion, "method": result.method}
        codebooks = evaluator.measure(choice, result.method, row) if evaluator is not None else None
        solved.append((b, choice, codebooks))
        rows.append(row)
    if not solved:
        raise AllocationError(f"{inputs}: no budget of {', '.join(f'{b:g}' for b in budgets)} bits per element is "
                              f"feasible: {rows[0]['error']}")
    summary: dict[str, Any] = {"inputs": str(inputs), "elements": elements, "allocations": rows}
    if evaluator is not None:
        summary.update(evaluator.header())
    with atomic_dir(out) as folder:
        for b, choice, codebooks in solved:
            write_bytes(folder / bit_allocation_name(b), format_bit_allocation(choice).encode())
            if codebooks is not None:
                write_bytes(folder / f"codebooks_{round(b * 10)}.txt", codebooks.encode())
        write_json(folder / "allocations.json", summary)
    return rows


class _Evaluator:
    """A calibrated model that measures allocations of a curve file."""

    def __init__(self, evaluation: SeedEvaluation, tensors: Sequence[SeedTensor], source: str) -> None:
        from qcompiler.data import load_dataset
        from qcompiler.ir import load_normalized
        from qcompiler.passes.calibrate import CalibratePass
        from qcompiler.passes.pipelines import canonical_pipeline
        from qcompiler.pipeline import run_pipeline

        model = load_normalized(evaluation.model)
        calib = load_dataset(evaluation.calib, model)
        passes = [*canonical_pipeline(), CalibratePass(data=calib, batch_size=evaluation.batch_size, show_progress=False)]
        self.model = run_pipeline(model, passes).model
        self.names = match_tensors(self.model, tensors, source)
        self.data = load_dataset(evaluation.eval, model) if evaluation.eval is not None else calib
        self.batch_size = evaluation.batch_size
        self.evaluation = evaluation
        self.float_top1: float | None = None

    def header(self) -> dict[str, Any]:
        return {"model": str(self.evaluation.model), "measured_on": self.data.source, "tensors": self.names,
                "float_top1": self.float_top1}

    def measure(self, choice: Sequence[SeedPoint], method: str, row: dict[str, Any]) -> str:
        """Apply ``choice``; add its measured MSE (and top-1) to ``row``; return its codebooks."""
        from qcompiler.api import labelled_top1

        apply_choice(self.model, self.names, choice, method)
        first = next(iter(iter_feeds(self.data, self.batch_size, self.model)))
        weights, activations = chosen_quantizers(self.model, first)
        total, samples, floats, quantized = 0.0, 0, [], []
        for ref, got in joint_outputs(self.model, self.data, self.batch_size, (weights, activations)):
            total += squared_error(ref, got)
            samples += next(iter(ref.values())).shape[0]
            floats.append(next(iter(ref.values())))
            quantized.append(next(iter(got.values())))
        row["measured_distortion"] = total / samples
        if self.data.labels is not None:
            if self.float_top1 is None:
                self.float_top1 = labelled_top1(np.concatenate(floats), self.data)
            row["top1"] = labelled_top1(np.concatenate(quantized), self.data)
        return codebook_lines(self.names, choice, {**weights, **activations})


# --------------------------------------------------------------------------- seed step 6: evaluation
def match_tensors(model: ir.Model, tensors: Sequence[SeedTensor], source: str) -> list[str]:
    """The model values a curve file's tensors stand for (the file's order: :func:`~qcompiler.passes.detect_layers.layer_tensors`).

    Raises:
        DataError: naming the file, when the counts of weights or activations differ, or a
            tensor's N (from its rates) is not the value's element count (per sample).
    """
    weights, activations = layer_tensors(model)
    file_weights = [t for t in tensors if not t.activation]
    file_activations = [t for t in tensors if t.activation]
    if len(file_weights) != len(weights) or len(file_activations) not in (0, len(activations)):
        raise DataError(f"{source}: {len(file_weights)} weights and {len(file_activations)} activations, the model "
                        f"has {len(weights)} weights and {len(activations)} activations entering its layers")
    names = weights + activations[: len(file_activations)]
    values = values_by_name(model.graph)
    for t, name in zip([*file_weights, *file_activations], names):
        n = static_size(values[name], per_sample=t.activation)
        if n is not None and not math.isclose(n, t.elements, rel_tol=1e-6):
            kind = "activation" if t.activation else "weight"
            raise DataError(f"{source}: {kind} {t.layer} has N = {t.elements:g} (rate / log2 L), the model's "
                            f"{name!r} has {n:g} elements{' per sample' if t.activation else ''}")
    return names


def apply_choice(model: ir.Model, names: Sequence[str], choice: Sequence[SeedPoint], method: str) -> None:
    """Annotate the chosen dead zone of every named value (``BitWidth``, for the quantizers and
    the joint measurement); a "not quantized" point leaves the value float."""
    values = values_by_name(model.graph)
    for name, point in zip(names, choice):
        candidate = point.candidate
        if candidate is None:
            ann.remove(values[name], ann.BitWidth)
            continue
        ann.set(values[name], ann.BitWidth(
            candidate=candidate.label, kind="deadzone", bits=candidate.bits, rate=point.rate,
            distortion=point.distortion, method=method))


def codebook_lines(names: Sequence[str], choice: Sequence[SeedPoint], fitted: Mapping[str, Fitted]) -> str:
    """``name dz L λ δ`` per tensor (the seed's codebooks, λ and δ with 12 decimals; ``- -`` for a
    tensor left float), from the fitted dead zones by name."""
    lines = []
    for name, point in zip(names, choice):
        if name not in fitted:  # not quantized
            lines.append(f"{name} {_number(point.dz)} {point.levels} - -\n")
            continue
        lam, delta = fitted[name].params
        lines.append(f"{name} {_number(point.dz)} {point.levels} {lam:.12f} {delta:.12f}\n")
    return "".join(lines)
