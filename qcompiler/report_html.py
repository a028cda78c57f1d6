"""``report.html``: the compile report as one self-contained page (plots embedded as PNG data).

Sections: the model summary; float vs simulated vs ORT-kernel metrics; the pipeline with
timings (and its ``--pipeline`` text); the per-layer table (op, shape, parameters, bits W/A,
WL/FL or scale, size, error); the weights' rate–distortion curves and the allocation's Pareto
front (the lower convex hull of the summed curves, the uniform baselines and the chosen point)
when the model was profiled; the target's own details (e.g. the MAX78000 memory map).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler import annotations as ann
from qcompiler.profiling import headless_pyplot

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def _cell(value: Any) -> str:
    if value is None:
        return "<td>–</td>"
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value:,}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _table(table_id: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    headless_pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _weight_profiles(model: ir.Model) -> dict[str, ann.ErrorProfile]:
    return {v.name: p for v in model.graph.initializers.values()
            if (p := ann.get(v, ann.ErrorProfile)) is not None and p.tensor_kind == "weight"}


def _rd_figure(profiles: Mapping[str, ann.ErrorProfile]) -> str:
    fig, ax = headless_pyplot().subplots(figsize=(7, 4))
    for name, p in profiles.items():
        order = np.argsort(p.rate_fixed)
        ax.plot(np.asarray(p.rate_fixed)[order] / 8 / 1024, np.maximum(np.asarray(p.distortion)[order], 1e-12),
                marker="o", ms=3, label=name)
    ax.set(xlabel="size (KiB)", ylabel="output MSE (log)", yscale="log", title="rate–distortion per weight")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def pareto_points(profiles: Mapping[str, ann.ErrorProfile], chosen: Mapping[str, ann.BitWidth]
                  ) -> dict[str, list[tuple[float, float]]]:
    """(size in bytes, summed distortion) of the front, the uniform baselines and the chosen point.

    The front is the lower convex hull of the summed curves: for each slope λ every tensor picks
    ``argmin D + λ·R`` (the equal-slope condition), over λ on a log grid.
    """
    front = []
    for lam in np.logspace(-12, 2, 200):
        size = dist = 0.0
        for p in profiles.values():
            i = int(np.argmin(np.asarray(p.distortion) + lam * np.asarray(p.rate_fixed)))
            size, dist = size + p.rate_fixed[i] / 8, dist + p.distortion[i]
        front.append((size, dist))
    uniform = []
    common = set.intersection(*(set(p.bits) for p in profiles.values())) if profiles else set()
    for b in sorted(common):
        size = dist = 0.0
        for p in profiles.values():
            i = next(j for j, c in enumerate(p.candidates) if p.bits[j] == b)
            size, dist = size + p.rate_fixed[i] / 8, dist + p.distortion[i]
        uniform.append((size, dist))
    point = []
    if chosen and all(name in chosen for name in profiles):
        point = [(sum(chosen[n].rate for n in profiles) / 8, sum(chosen[n].distortion for n in profiles))]
    return {"front": sorted(set(front)), "uniform": uniform, "chosen": point}


def _pareto_figure(points: Mapping[str, list[tuple[float, float]]]) -> str:
    fig, ax = headless_pyplot().subplots(figsize=(7, 4))
    if points["front"]:
        x, y = zip(*points["front"])
        ax.plot(np.asarray(x) / 1024, np.maximum(y, 1e-12), "-", color="#888", label="front (convex hull)")
    if points["uniform"]:
        x, y = zip(*points["uniform"])
        ax.plot(np.asarray(x) / 1024, np.maximum(y, 1e-12), "s", label="uniform widths")
    if points["chosen"]:
        x, y = zip(*points["chosen"])
        ax.plot(np.asarray(x) / 1024, np.maximum(y, 1e-12), "*", ms=14, color="crimson", label="chosen")
    ax.set(xlabel="weight size (KiB)", ylabel="predicted output MSE (log)", yscale="log", title="allocation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def additivity_line(allocation: Mapping[str, Any]) -> str:
    """One sentence: the allocation's predicted output MSE against its joint measurement."""
    ratio = allocation.get("additivity_ratio")
    points = allocation.get("profile_points") or {}
    curves = (f"; curves: {points['measured']} of {points['total']} points measured ({', '.join(points['modes'])})"
              if points.get("total") else "")
    return (f"allocation: predicted output MSE {allocation['predicted_distortion']:.4g} (sum over tensors), "
            f"measured with every allocated tensor quantized at once {allocation['measured_distortion']:.4g}"
            + (f" (additivity ratio {ratio:.2f})" if ratio is not None else "") + curves)


def _chosen_widths(model: ir.Model) -> dict[str, ann.BitWidth]:
    """The allocator's choice per weight, by name."""
    return {v.name: b for v in model.graph.initializers.values() if (b := ann.get(v, ann.BitWidth)) is not None}


def _layer_rows(report: Mapping[str, Any], chosen: Mapping[str, ann.BitWidth]) -> list[list[Any]]:
    """Per layer: name, op, shape, params, bits, format, size, the profiled output MSE of its
    chosen width (when allocated), its weight SQNR against the float weights, and the target's
    simulated layer output SQNR and clamped fraction (MAX78000)."""
    rows = []
    for r in report.get("layers", []):
        fmt = (f"fl {r.get('weight_fl_min')}..{r.get('weight_fl_max')}" if r.get("weight_fl_min") is not None
               else r.get("weight_scale"))
        rows.append([r.get("name"), r.get("op"), "×".join(str(d) for d in r.get("weight_shape", [])), r.get("params"),
                     r.get("weight_bits"), r.get("activation_bits"), fmt, r.get("weight_bytes"),
                     chosen[r["weight"]].distortion if r.get("weight") in chosen else None,
                     r.get("weight_sqnr_db"), r.get("output_sqnr_db"), r.get("saturated_fraction")])
    return rows


def _gpfq_section(gpfq: Mapping[str, Any]) -> list[str]:
    """GPFQ against round-to-nearest on the same grids: per layer and at the output."""
    rows = [[r["name"], r["op"], r["bits"], r["rows"], r["error"], r["error_rtn"],
             r["error_rtn"] / r["error"] if r["error"] > 0 else None] for r in gpfq.get("layers", [])]
    output = [[key, gpfq.get(key), gpfq.get(f"{key}_rtn")] for key in ("sqnr_db", "output_mse", "top1_agreement")]
    return ["<h2>GPFQ vs round-to-nearest</h2>",
            f"<p>Relative layer output error ‖XWᵀ − X̃Qᵀ‖/‖XWᵀ‖ over {gpfq.get('samples')} calibration samples, "
            "and the model output against float, for GPFQ's weights and for round-to-nearest on the same grids.</p>",
            _table("gpfq-layers", ["layer", "op", "bits", "rows", "GPFQ", "RTN", "RTN / GPFQ"], rows),
            _table("gpfq-output", ["at the output", "GPFQ", "RTN"], output)]


def render_html(report: Mapping[str, Any], model: ir.Model) -> str:
    """The page for ``report`` (the ``report.json`` content) of the annotated ``model``."""
    metrics = report.get("metrics", {})
    keys = ("top1", "sqnr_db", "top1_agreement", "output_mse", "mean_cosine")
    metric_rows = [[k] + [metrics.get(mode, {}).get(k) for mode in ("float", "simulated", "ort_kernel")] for k in keys]
    pipeline_rows = [[s["pass"], s["seconds"], s["modified"]] for s in report.get("pipeline", [])]
    summary = report.get("summary", {})
    chosen = _chosen_widths(model)
    parts = [
        f"<h1>qcompiler report: {html.escape(str(report.get('model')))} → {html.escape(str(report.get('target')))}</h1>",
        f"<p>qcompiler {html.escape(str(report.get('qcompiler')))}; validated on the "
        f"{html.escape(str(report.get('validation_split')))} split; {summary.get('quantized_layers')} quantized layers, "
        f"{summary.get('params', 0):,} parameters, {summary.get('weight_bytes', 0):,} weight bytes.</p>",
        "<h2>Accuracy: float vs simulated vs ORT kernel</h2>",
        _table("metrics", ["metric", "float", "simulated", "ORT kernel"], metric_rows),
        "".join(f"<p>note: {html.escape(str(n))}</p>" for n in report.get("notes", [])),
        "<h2>Layers</h2>",
        _table("layers", ["layer", "op", "weight shape", "params", "bits W", "bits A", "WL/FL or scale",
                          "weight bytes", "profiled output MSE", "weight SQNR dB", "output SQNR dB (target)",
                          "clamped fraction (target)"],
               _layer_rows(report, chosen)),
    ]
    if report.get("gpfq"):
        parts += _gpfq_section(report["gpfq"])
    profiles = _weight_profiles(model)
    if profiles:
        parts += ["<h2>Rate–distortion curves</h2>", f'<img id="rd" alt="rate-distortion curves" src="{_rd_figure(profiles)}">',
                  "<h2>Allocation: Pareto front</h2>",
                  f'<img id="pareto" alt="Pareto front" src="{_pareto_figure(pareto_points(profiles, chosen))}">']
    allocation = report.get("allocation") or {}
    if allocation.get("measured_distortion") is not None:
        parts.append(f'<p id="additivity">{html.escape(additivity_line(allocation))}</p>')
    parts += ["<h2>Pipeline</h2>", _table("pipeline", ["pass", "seconds", "modified"], pipeline_rows)]
    if report.get("pipeline_text"):
        parts.append(f"<pre id=\"pipeline-text\">{html.escape(report['pipeline_text'])}</pre>")
    if report.get("target_details"):
        details = {k: v for k, v in report["target_details"].items() if k != "layers"}
        parts += [f"<h2>Target: {html.escape(str(report.get('target')))}</h2>",
                  f'<pre id="target">{html.escape(json.dumps(details, indent=1, sort_keys=True, default=str))}</pre>']
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>qcompiler report</title>'
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")
