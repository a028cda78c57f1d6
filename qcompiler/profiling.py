"""``qcompile profile``: calibrate, measure rate-distortion curves, export JSON and plots.

Writes into the output folder (atomically):

- ``model.profiled.onnx``: the IR with :class:`TensorStats` and :class:`ErrorProfile` annotations;
- ``stats/``: the calibration sidecar (histograms and reservoirs per activation);
- ``profiles.json``: every curve (candidate, bits, rates, distortion, measured flag) per tensor,
  plus, in ``both`` mode, how well ``fast`` predicts ``exact`` (Spearman, relative error);
- ``pareto_condition_inputs.txt`` (with ``export_pareto_inputs``): seed 000's curve file;
- ``plots/<tensor>.png``: rate (bits per element) against distortion on a log scale, one line
  per quantizer kind; in ``both`` mode the ``fast`` predictions are drawn dashed over ``exact``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.candidates import Candidate, candidate_set
from qcompiler.data import DataSource, load_dataset
from qcompiler.fsutil import atomic_dir, write_bytes, write_json
from qcompiler.graph import values_by_name
from qcompiler.ir import ModelLike, load_normalized, save
from qcompiler.pareto_files import INPUTS_NAME, format_pareto_inputs, profiles_to_seed
from qcompiler.passes.calibrate import CalibratePass, safe_filename
from qcompiler.passes.pipelines import canonical_pipeline
from qcompiler.passes.profile_errors import ProfileErrorPass, agreement
from qcompiler.pipeline import run_pipeline


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """Options of ``qcompile profile``.

    Attributes:
        calib: calibration data.
        mode: ``exact``, ``fast`` or ``both`` (both measures and compares).
        candidates: the candidate set.
        tensors: ``all``, ``weights`` or ``activations``.
        batch_size: batch size.
        plots: write one PNG per tensor.
        show_progress: progress bars on a terminal.
        export_pareto_inputs: also write seed 000's ``pareto_condition_inputs.txt`` (the
            dead-zone points of every tensor, :mod:`qcompiler.pareto_files`).
    """

    calib: DataSource
    mode: str = "exact"
    candidates: tuple[Candidate, ...] = tuple(candidate_set())
    tensors: str = "all"
    batch_size: int = 64
    plots: bool = True
    show_progress: bool = True
    export_pareto_inputs: bool = False


def _profiles(model: ir.Model) -> dict[str, ann.ErrorProfile]:
    return {n: p for n, v in values_by_name(model.graph).items() if (p := ann.get(v, ann.ErrorProfile)) is not None}


def profile_model(model: ModelLike, config: ProfileConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run the profile and write its outputs; return the ``profiles.json`` content."""
    if config.mode not in ("exact", "fast", "both"):
        from qcompiler.errors import QCompilerError

        raise QCompilerError(f"profile mode must be exact, fast or both, got {config.mode!r}")
    ir_model = load_normalized(model)
    calib = load_dataset(config.calib, ir_model)
    with atomic_dir(out_dir) as folder:
        passes = [
            *canonical_pipeline(),
            CalibratePass(data=calib, batch_size=config.batch_size, sidecar_dir=folder / "stats",
                          show_progress=config.show_progress),
        ]
        prepared = run_pipeline(ir_model, passes).model
        modes = ("exact", "fast") if config.mode == "both" else (config.mode,)
        results: dict[str, dict[str, ann.ErrorProfile]] = {}
        final = prepared
        for mode in modes:
            target = prepared if mode == modes[-1] else prepared.clone()
            _copy_meta(prepared, target)
            run_pipeline(target, [ProfileErrorPass(data=calib, candidates=config.candidates, mode=mode,
                                                   tensors=config.tensors, batch_size=config.batch_size,
                                                   show_progress=config.show_progress)])
            results[mode] = _profiles(target)
            final = target
        report = _report(results)
        if config.export_pareto_inputs:
            seed = profiles_to_seed(final, results[modes[0]])  # exact's curves in both mode
            write_bytes(folder / INPUTS_NAME, format_pareto_inputs(seed).encode())
            report["pareto_inputs"] = {"file": INPUTS_NAME, "tensors": [t.name for t in seed]}
        save(final, folder / "model.profiled.onnx")
        write_json(folder / "profiles.json", report)
        if config.plots:
            predicted = results["fast"] if config.mode == "both" else {}
            for name, profile in results[modes[0]].items():
                plot_curve(name, profile, folder / "plots" / f"{safe_filename(name)}.png", predicted.get(name))
    return report


def _copy_meta(source: ir.Model, target: ir.Model) -> None:
    """Carry calibration's in-memory reservoirs to a clone (``meta`` is not cloned)."""
    src, dst = values_by_name(source.graph), values_by_name(target.graph)
    for name, value in src.items():
        if name in dst and dst[name] is not value:
            for key, item in value.meta.items():
                dst[name].meta[key] = item


def _report(results: dict[str, dict[str, ann.ErrorProfile]]) -> dict[str, Any]:
    first = next(iter(results.values()))
    tensors = {}
    for name in first:
        entry = {mode: json_profile(profiles[name]) for mode, profiles in results.items()}
        if "exact" in results and "fast" in results:
            entry["fast_vs_exact"] = agreement(results["exact"][name], results["fast"][name])
        tensors[name] = entry
    out: dict[str, Any] = {"tensors": tensors}
    if "exact" in results and "fast" in results:
        rhos = [t["fast_vs_exact"]["spearman"] for t in tensors.values() if np.isfinite(t["fast_vs_exact"]["spearman"])]
        rels = [t["fast_vs_exact"]["median_relative_error"] for t in tensors.values()]
        out["fast_vs_exact"] = {
            "mean_spearman": float(np.mean(rhos)) if rhos else None,
            "median_relative_error": float(np.median(rels)) if rels else None,
        }
    return out


def json_profile(profile: ann.ErrorProfile) -> dict[str, Any]:
    """An ErrorProfile as rows, for JSON export."""
    log2 = profile.rate_log2 if len(profile.rate_log2) == len(profile.candidates) else (None,) * len(profile.candidates)
    rows = [
        {"candidate": c, "bits": b, "rate_fixed": rf, "rate_entropy": re, "rate_log2": rl, "distortion": d, "measured": m}
        for c, b, rf, re, rl, d, m in zip(profile.candidates, profile.bits, profile.rate_fixed, profile.rate_entropy,
                                          log2, profile.distortion, profile.measured)
    ]
    return {"kind": profile.tensor_kind, "elements": profile.elements, "mode": profile.mode, "rows": rows}


def headless_pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _kind_of(label: str) -> str:
    """The curve a candidate belongs to: its quantizer kind, with the ratio for dead zones."""
    parts = label.split(":")
    return parts[0] + (":" + parts[2] if parts[0] == "deadzone" else "")


def _curves(profile: ann.ErrorProfile) -> dict[str, tuple[list[float], list[float]]]:
    """Per kind: rates (entropy bits per element) and distortions, in increasing rate."""
    kinds: dict[str, list[int]] = {}
    for i, label in enumerate(profile.candidates):
        kinds.setdefault(_kind_of(label), []).append(i)
    curves = {}
    for key, idx in sorted(kinds.items()):
        idx = sorted(idx, key=lambda i: profile.rate_entropy[i])
        curves[key] = ([profile.rate_entropy[i] / profile.elements for i in idx],
                       [max(profile.distortion[i], 1e-12) for i in idx])
    return curves


def rate_distortion_figure(name: str, profile: ann.ErrorProfile, predicted: ann.ErrorProfile | None = None) -> Any:
    """Rate (entropy bits per element) vs distortion on a log scale, one line per quantizer kind.

    Args:
        name: the tensor, for the title.
        profile: the curves drawn solid.
        predicted: the same tensor's ``fast`` profile, drawn dashed in the same colours, so the
            plot shows where the additive-noise model departs from the measurement.

    Returns:
        The matplotlib figure (the caller saves and closes it).
    """
    plt = headless_pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    guesses = _curves(predicted) if predicted is not None else {}
    for key, (rate, dist) in _curves(profile).items():
        (line,) = ax.plot(rate, dist, marker="o", markersize=3, label=key)
        if key in guesses:
            ax.plot(*guesses[key], linestyle="--", marker="o", markersize=3, markerfacecolor="none",
                    color=line.get_color(), linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("rate (entropy bits per element)")
    ax.set_ylabel("logit MSE")
    dashed = f"; dashed: {predicted.mode}" if predicted is not None else ""
    ax.set_title(f"{name} ({profile.tensor_kind}, {profile.mode}{dashed})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_curve(name: str, profile: ann.ErrorProfile, path: Path, predicted: ann.ErrorProfile | None = None) -> None:
    """Write :func:`rate_distortion_figure` as a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = rate_distortion_figure(name, profile, predicted)
    # PNG metadata carries the matplotlib version only: same data, same bytes.
    fig.savefig(path, metadata={"Software": None})
    headless_pyplot().close(fig)
