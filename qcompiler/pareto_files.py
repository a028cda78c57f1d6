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

import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.allocation import Allocation, AllocationError, Curve, allocate
from qcompiler.candidates import parse_candidate
from qcompiler.errors import DataError
from qcompiler.graph import values_by_name
from qcompiler.passes.detect_layers import quantizable_nodes

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
    weights, activations = [], []
    for _, layer in quantizable_nodes(model):
        for name, bucket in ((layer.weight, weights), (layer.activation_input, activations)):
            if name not in bucket and name in profiles:
                bucket.append(name)
    out = []
    for kind_index, names in ((0, weights), (1, activations)):
        for index, name in enumerate(names):
            profile = profiles[name]
            if len(profile.rate_log2) != len(profile.candidates):
                raise DataError(f"{name}: its profile has no log2 rates: profile again")
            points = []
            for label, rate, distortion in zip(profile.candidates, profile.rate_log2, profile.distortion):
                candidate = parse_candidate(label)
                # activations take ratio-0 codebooks in the seed; their dz is written as -1
                if candidate.kind == "deadzone" and not (kind_index and candidate.ratio):
                    dz = -1.0 if kind_index else candidate.ratio * 100.0
                    points.append(SeedPoint(dz, candidate.level_count, rate, distortion))
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


def run_seed_allocation(inputs: str | Path, budgets: Sequence[float], out: str | Path, method: str = "knapsack",
                        max_point_error: float | None = None) -> list[dict[str, float | str]]:
    """Seed 000's step 5 from a curve file: one ``bit_allocation_{10·b̄}.txt`` per feasible budget
    and ``allocations.json`` (per budget: rate used per element, Σ D, the solver; or why it is
    infeasible) in ``out``.

    Raises:
        DataError: an unreadable curve file. AllocationError: no budget is feasible.
    """
    from qcompiler.fsutil import atomic_dir, check_output_dir, write_bytes, write_json

    tensors = read_pareto_inputs(inputs)
    check_output_dir(out)
    elements = sum(t.elements for t in tensors)
    rows: list[dict[str, float | str]] = []
    solved = []
    for b in budgets:
        try:
            choice, result = allocate_seed(tensors, b, method, max_point_error)
        except AllocationError as exc:  # below the smallest candidates: reported, the others still run
            rows.append({"avg_bits": b, "error": str(exc)})
            continue
        solved.append((b, choice))
        rows.append({"avg_bits": b, "file": bit_allocation_name(b), "rate_per_element": result.rate / elements,
                     "distortion": result.distortion, "method": result.method})
    if not solved:
        raise AllocationError(f"{inputs}: no budget of {', '.join(f'{b:g}' for b in budgets)} bits per element is "
                              f"feasible: {rows[0]['error']}")
    with atomic_dir(out) as folder:
        for b, choice in solved:
            write_bytes(folder / bit_allocation_name(b), format_bit_allocation(choice).encode())
        write_json(folder / "allocations.json", {"inputs": str(inputs), "elements": elements, "allocations": rows})
    return rows
