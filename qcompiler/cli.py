"""The ``qcompile`` command line (typer), a thin layer over :mod:`qcompiler.api`.

``qcompile MODEL --target fixed-point --calib DATA [--eval DATA] -o OUT`` compiles (the
``compile`` sub-command is the default). Errors print one line and exit with code 2 for bad
input; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperGroup

from qcompiler import __version__
from qcompiler.errors import QCompilerError, one_line

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


#: ``--settings FILE.toml`` (anywhere on the command line): option defaults for every sub-command.
SETTINGS_OPTION = "--settings"


def _pop_settings(args: list[str]) -> tuple[list[str], str | None]:
    """The arguments without ``--settings FILE`` (or ``--settings=FILE``), and FILE."""
    out, settings, i = [], None, 0
    while i < len(args):
        arg = args[i]
        if arg == SETTINGS_OPTION:
            if i + 1 >= len(args):
                raise QCompilerError(f"{SETTINGS_OPTION} needs a file")
            settings, i = args[i + 1], i + 2
            continue
        if arg.startswith(SETTINGS_OPTION + "="):
            settings = arg.split("=", 1)[1]
        else:
            out.append(arg)
        i += 1
    return out, settings


def load_settings(path: str | Path, commands: dict[str, Any], default_command: str) -> dict[str, dict[str, Any]]:
    """Option defaults from a TOML file: top-level keys are ``compile`` options, ``[profile]``,
    ``[gpfq]``, ... tables hold a sub-command's options. Keys are option names with ``-`` or
    ``_`` (``weight-bits`` = ``weight_bits``); the command line overrides them; relative paths are
    relative to the working directory, as on the command line.

    Raises:
        QCompilerError: an unreadable file, an unknown table or option (naming file and key).
    """
    import tomllib

    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise QCompilerError(f"{path}: no such settings file") from None
    except tomllib.TOMLDecodeError as exc:
        raise QCompilerError(f"{path}: not valid TOML ({exc})") from None
    tables = {default_command: {k: v for k, v in data.items() if not isinstance(v, dict)}}
    for name, table in data.items():
        if isinstance(table, dict):
            if name not in commands:
                raise QCompilerError(f"{path}: unknown table [{name}] (commands: {', '.join(sorted(commands))})")
            tables.setdefault(name, {}).update(table)
    out: dict[str, dict[str, Any]] = {}
    for name, table in tables.items():
        params = {}  # the parameter each accepted key names: its long options and its own name
        for param in commands[name].params:
            for alias in [param.name, *(o[2:] for o in param.opts if o.startswith("--"))]:
                params[alias.replace("-", "_")] = param.name
        for key, value in table.items():
            option = params.get(key.replace("-", "_"))
            if option is None or option == "debug":
                where = f"[{name}]" if name != default_command or key not in data else "top level (compile)"
                raise QCompilerError(f"{path}: {where} has no option {key!r}")
            if isinstance(value, list):  # list options are comma-separated on the command line
                value = ",".join(str(v) for v in value)
            out.setdefault(name, {})[option] = value
    return out


class DefaultCommandGroup(TyperGroup):
    """A group whose first argument, when it is not a sub-command, goes to ``compile``; a
    ``--settings FILE.toml`` anywhere supplies option defaults (:func:`load_settings`)."""

    default_command = "compile"

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            args, settings = _pop_settings(list(args))
            if settings is not None:
                ctx.default_map = load_settings(settings, self.commands, self.default_command)
        except QCompilerError as exc:
            typer.echo(f"error: {one_line(exc)}", err=True)
            ctx.exit(EXIT_BAD_INPUT)
        if settings is not None and not args:  # everything came from the file
            args = [self.default_command]
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=DefaultCommandGroup,
    add_completion=False,
    no_args_is_help=True,
    help="qcompiler: compile a float ONNX model into a quantized, validated integer model.",
    pretty_exceptions_enable=False,
)


def _fail(exc: BaseException, debug: bool, code: int) -> None:
    if debug:
        raise exc
    typer.echo(f"error: {one_line(exc)}", err=True)
    raise typer.Exit(code)


def _run(debug: bool, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; turn errors into one line and an exit code (2 = bad input, 1 = internal)."""
    try:
        return fn(*args, **kwargs)
    except QCompilerError as exc:
        _fail(exc, debug, EXIT_BAD_INPUT)
    except typer.Exit:
        raise
    except Exception as exc:  # an internal error still gets one line, never a raw traceback
        if debug:
            raise
        typer.echo(f"internal error: {type(exc).__name__}: {one_line(exc)} (run with --debug for the traceback)", err=True)
        raise typer.Exit(EXIT_INTERNAL) from None


def _print_summary(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a log or a pipe: rich would assume 80 columns and fold the tables
        console = Console(width=160)
    metrics = result.report["metrics"]
    table = Table(title=f"validation on the {result.report['validation_split']} split")
    table.add_column("metric")
    for col in ("float", "simulated", "ORT kernel"):
        table.add_column(col, justify="right")

    def cell(mode: str, key: str, fmt: str) -> str:
        value = metrics.get(mode, {}).get(key)
        return "-" if value is None else format(value, fmt)

    if "top1" in metrics["float"]:
        table.add_row("top-1", cell("float", "top1", ".4f"), cell("simulated", "top1", ".4f"), cell("ort_kernel", "top1", ".4f"))
    table.add_row("logit SQNR (dB)", "-", cell("simulated", "sqnr_db", ".2f"), cell("ort_kernel", "sqnr_db", ".2f"))
    table.add_row(
        "top-1 agreement", "-", cell("simulated", "top1_agreement", ".4f"), cell("ort_kernel", "top1_agreement", ".4f")
    )
    console.print(table)
    for note in result.report.get("notes", []):
        console.print(f"note: {note}")
    allocation = result.report.get("allocation") or {}
    if allocation.get("measured_distortion") is not None:
        from qcompiler.report_html import additivity_line

        console.print(additivity_line(allocation))
    console.print(layer_summary_table(result.report["layers"]))
    gpfq = result.report.get("gpfq")
    if gpfq:
        console.print(gpfq_table(gpfq))
        console.print(gpfq_line(gpfq))
    if result.out_dir is not None:
        console.print(f"wrote {result.out_dir}/ ({', '.join(result.report['artifacts'])})")


def _field(key: str, fmt: str = "", scale: float | None = None) -> Any:
    """A layer-table cell: ``row[key]`` (times ``scale``) formatted, or None when absent."""
    return lambda row: None if row.get(key) is None else format(row[key] if scale is None else row[key] * scale, fmt)


#: Columns of the terminal's layer table: header and cell (None when the row lacks it). Columns
#: no layer has are left out: the fixed-point formats mean nothing on MAX78000, whose layers
#: report their simulated output SQNR and clamped fraction instead.
LAYER_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("layer", _field("name")),
    ("op", _field("op")),
    ("params", _field("params")),
    ("W bits", _field("weight_bits")),
    ("W FL", lambda row: None if row.get("weight_fl_min") is None else f"{row['weight_fl_min']}..{row['weight_fl_max']}"),
    ("A bits", _field("activation_bits")),
    ("A FL", _field("activation_fl")),
    ("W SQNR dB", _field("weight_sqnr_db", ".1f")),
    ("out SQNR dB", _field("output_sqnr_db", ".1f")),
    ("clamped %", _field("saturated_fraction", ".2f", 100.0)),
)


def _name_column(names: list[str]) -> dict[str, Any]:
    """Options of a table's layer-name column: never cut, since names often differ only at the
    end (``node_conv2d_1`` … ``node_conv2d_19``); the other columns fold on a narrow terminal."""
    return {"no_wrap": True, "min_width": min(max((len(n) for n in names), default=5), 48)}


def layer_summary_table(rows: list[Mapping[str, Any]]) -> Any:
    """The terminal's per-layer table (the report's ``layers``), with the columns some layer has."""
    from rich.table import Table

    columns = [(head, cell) for head, cell in LAYER_COLUMNS
               if head in ("layer", "op", "params") or any(cell(row) is not None for row in rows)]
    table = Table(title="quantized layers")
    for head, _ in columns:
        table.add_column(head, **(_name_column([str(row.get("name", "")) for row in rows]) if head == "layer"
                                  else {"overflow": "fold"}))
    for row in rows:
        table.add_row(*("-" if (text := cell(row)) is None else text for _, cell in columns))
    return table


def gpfq_table(gpfq: Mapping[str, Any]) -> Any:
    """GPFQ's and round-to-nearest's relative layer output errors ‖XWᵀ − X̃Qᵀ‖/‖XWᵀ‖, per
    rewritten layer (the report's ``gpfq`` section)."""
    from rich.table import Table

    table = Table(title="GPFQ vs round-to-nearest: relative layer output error")
    table.add_column("layer", **_name_column([row["name"] for row in gpfq["layers"]]))
    for col in ("bits", "rows", "GPFQ", "RTN", "RTN / GPFQ"):
        table.add_column(col, justify="right", overflow="fold")
    for row in gpfq["layers"]:
        ratio = row["error_rtn"] / row["error"] if row["error"] > 0 else float("inf")
        table.add_row(row["name"], str(row["bits"]), str(row["rows"]), f"{row['error']:.4f}",
                      f"{row['error_rtn']:.4f}", f"{ratio:.2f}")
    return table


def gpfq_line(gpfq: Mapping[str, Any]) -> str:
    """One line comparing GPFQ with round-to-nearest on the same grids, at the model output over
    the calibration samples (the report's ``gpfq`` section)."""
    line = (f"GPFQ vs round-to-nearest at the output ({gpfq['samples']} calibration samples): "
            f"SQNR {gpfq['sqnr_db']:.2f} vs {gpfq['sqnr_db_rtn']:.2f} dB, "
            f"MSE {gpfq['output_mse']:.4g} vs {gpfq['output_mse_rtn']:.4g}")
    if gpfq.get("top1_agreement") is not None:
        line += f", top-1 agreement {gpfq['top1_agreement']:.4f} vs {gpfq['top1_agreement_rtn']:.4f}"
    return line


def split_list(text: str) -> tuple[str, ...]:
    """``"a, b,c"`` -> ``("a", "b", "c")`` (empty items dropped)."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


CHECKPOINT_SUFFIXES = (".pth.tar", ".pth", ".pt", ".tar")


def given_flags(*options: tuple[str, object]) -> list[str]:
    """The flags among ``(flag, value)`` pairs that the user set (value not None)."""
    return [flag for flag, value in options if value is not None]


def is_checkpoint(path: Path) -> bool:
    """A PyTorch checkpoint by name (quantize.py mode) rather than an ONNX model."""
    return any(path.name.endswith(suffix) for suffix in CHECKPOINT_SUFFIXES)


def quantize_checkpoint(
    source: Path, target: str, out: Optional[Path], config_file: Optional[Path], clip_method: Optional[str],
    qat_weight_bits: Optional[int], scale: Optional[float], stddev: Optional[float], device: str, verbose: bool,
) -> None:
    """The quantize.py drop-in: ``qcompile CKPT --target max78000 -o OUT.pth.tar``."""
    from qcompiler.targets.max78000.quantize import QuantizeOptions, quantize_file

    if target != "max78000":
        raise QCompilerError(f"{source}: a PyTorch checkpoint can only be quantized for --target max78000")
    if out is None:
        raise QCompilerError("quantize.py mode needs the output checkpoint: -o OUT.pth.tar")
    options = QuantizeOptions(device=device, clip_method=clip_method.upper() if clip_method else None,
                              qat_weight_bits=qat_weight_bits, scale=scale, stddev=stddev)
    if clip_method and clip_method.upper() == "SCALE" and scale is None:
        typer.echo("warning: --clip-method SCALE without --scale: using 0.85", err=True)
    if clip_method and clip_method.upper() == "STDDEV" and stddev is None:
        typer.echo("warning: --clip-method STDDEV without --stddev: using 2.0", err=True)
    result = quantize_file(source, out, options, config_file, echo=typer.echo if verbose else None,
                           warn=lambda text: typer.echo(f"warning: {text}", err=True))
    if verbose:
        for layer in result.layers:
            if layer.clamped_weights or layer.clamped_biases:
                typer.echo(f"{layer.key}: {layer.clamped_weights} weights and {layer.clamped_biases} biases saturated")


@app.command("compile")
def compile_command(
    model: Path = typer.Argument(..., help="The float model (.onnx)."),
    target: str = typer.Option("fixed-point", "--target", "-t", help="Target backend."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration data (.npz keyed by input name, or .npy)."),
    eval_data: Optional[Path] = typer.Option(None, "--eval", help="Held-out data with 'labels' for accuracy."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default out/<model>-<target>)."),
    weight_bits: int = typer.Option(8, "--weight-bits", "--bits", help="Weight word length."),
    activation_bits: int = typer.Option(8, "--activation-bits", help="Activation word length."),
    per_tensor: bool = typer.Option(False, "--per-tensor", help="One weight scale per tensor instead of per channel."),
    calib_method: str = typer.Option(
        "minmax", "--calib-method", help="Activation range chooser: minmax, percentile, entropy or mse."
    ),
    percentile: float = typer.Option(99.99, "--percentile", help="Percentile of |x| for --calib-method percentile."),
    avg_bits: Optional[float] = typer.Option(None, "--avg-bits", help="Mixed precision: average bits per element."),
    total_bytes: Optional[float] = typer.Option(None, "--total-bytes", help="Mixed precision: size budget in bytes."),
    allocator: str = typer.Option("knapsack", "--allocator", help="knapsack, pareto, pareto-faithful, hull, hull-fill, uniform, or greedy (seed 002, with --max-loss)."),
    allocate_scope: str = typer.Option("weights", "--allocate", help="What the budget covers: weights or all."),
    profile_from: Optional[Path] = typer.Option(None, "--profile-from", help="Allocate from the curves in this file (model.profiled.onnx of qcompile profile, or a previous compile's model.annotated.onnx) instead of profiling."),
    profile_mode: str = typer.Option("exact", "--profile-mode", help="Distortion curves the allocator reads: exact (every candidate measured), fast (additive-noise model) or hybrid (fast, then the candidates around the solution measured until it is)."),
    max_loss: Optional[float] = typer.Option(
        None, "--max-loss", help="Accuracy-aware: smallest budget whose held-out top-1 drops at most this (0.01 = 1 point)."
    ),
    fl_rule: str = typer.Option("minmax", "--fl-rule", help="Weight FL: minmax, mse, mae, seed002 or ristretto."),
    batch_size: int = typer.Option(64, "--batch-size", help="Batch size for calibration and validation."),
    gpfq: bool = typer.Option(False, "--gpfq", help="Rewrite the weights with GPFQ on the target's grid."),
    gpfq_scalar: float = typer.Option(1.0, "--gpfq-scalar", help="GPFQ alphabet scalar C (scales the weight range)."),
    gpfq_samples: Optional[int] = typer.Option(None, "--gpfq-samples", help="GPFQ calibration samples per layer (default all)."),
    gpfq_rounding: str = typer.Option("nearest", "--gpfq-rounding", help="GPFQ rounding: nearest or stochastic."),
    gpfq_bias_correction: str = typer.Option("none", "--gpfq-bias-correction", help="GPFQ bias correction: none, last or all."),
    gpfq_skip: str = typer.Option("", "--gpfq-skip", help="Layers GPFQ leaves alone: node names or indices, comma-separated."),
    gpfq_token_mask: Optional[str] = typer.Option(None, "--gpfq-token-mask", help="GPFQ: model input masking padded tokens (e.g. attention_mask)."),
    gpfq_target_inputs: str = typer.Option("fp", "--gpfq-target-inputs", help="GPFQ objective: fp (float inputs) or quantized (the quantized model's inputs)."),
    gpfq_cache_mb: int = typer.Option(1024, "--gpfq-cache-mb", help="GPFQ: memory (MB) for the activations kept between layers (incremental prefixes); 0 recomputes every layer's input from the model inputs."),
    gpfq_damping: float = typer.Option(0.0, "--gpfq-damping", help="GPFQ: also weigh λ·‖W − Q‖², λ as a fraction of mean diag(X̃ᵀX̃) (helps when calibration rows are fewer than a layer's columns)."),
    finetune_data: Optional[Path] = typer.Option(None, "--finetune-data", help="Fine-tune after quantization (QAT) on this .npz (inputs + labels)."),
    epochs: int = typer.Option(10, "--epochs", help="Fine-tune epochs."),
    finetune_lr: float = typer.Option(1e-3, "--finetune-lr", help="Fine-tune learning rate."),
    finetune_optimizer: str = typer.Option("adam", "--finetune-optimizer", help="Fine-tune optimiser: adam or sgd."),
    finetune_schedule: str = typer.Option("cosine", "--finetune-schedule", help="Fine-tune LR schedule: cosine, step or constant."),
    finetune_distill: str = typer.Option("none", "--finetune-distill", help="Distil from the float model: none, mse or kl."),
    finetune_distill_weight: float = typer.Option(0.5, "--finetune-distill-weight", help="Weight α of the distillation term (loss = (1−α)·task + α·distill); 1 needs no labels."),
    finetune_patience: int = typer.Option(3, "--finetune-patience", help="Early stop after this many epochs without held-out gain (0 = never)."),
    pipeline: Optional[str] = typer.Option(None, "--pipeline", help='Passes as text, e.g. "calibrate(methods=percentile),profile(mode=fast),allocate(avg_bits=4),gpfq(bits=4)"; the target\'s passes run between analysis and rewrites.'),
    tune_cuts: bool = typer.Option(False, "--tune-cuts", help="Greedy WL search: retrain (one epoch per trial, --finetune-data) when a cut overshoots --max-loss (seed 002's tune_model)."),
    keep_float: str = typer.Option(
        "", "--keep-float", help="Nodes left in float: node names or op types, comma-separated ('unsupported' = every node the target cannot represent)."
    ),
    native_int4: bool = typer.Option(False, "--native-int4", help="fixed-point: store weights of <= 4 bits as native INT4 (opset 21)."),
    dump_ir: Optional[Path] = typer.Option(None, "--dump-ir", help="Write the IR after every pass into this folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars and no summary tables."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    config_file: Optional[Path] = typer.Option(None, "--config-file", "-c", help="quantize.py mode: network YAML with per-layer quantization."),
    clip_method: Optional[str] = typer.Option(None, "--clip-method", help="quantize.py mode: AVGMAX, MAX, STDDEV or SCALE (default: QAT mode)."),
    qat_weight_bits: Optional[int] = typer.Option(None, "--qat-weight-bits", help="quantize.py mode: weight bits when neither YAML nor checkpoint sets them."),
    scale: Optional[float] = typer.Option(None, "--scale", help="quantize.py mode: SCALE method fraction (default 0.85)."),
    stddev: Optional[float] = typer.Option(None, "--stddev", help="quantize.py mode: STDDEV method deviations (default 2.0)."),
    device: str = typer.Option("MAX78000", "--device", help="quantize.py mode: device (MAX78000, MAX78002, ...)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="quantize.py mode: upstream's per-layer printout."),
) -> None:
    """Compile MODEL for a target and validate it in onnxruntime.

    Given a PyTorch checkpoint (.pth.tar) and --target max78000, acts as a drop-in replacement
    of ai8x-synthesis quantize.py: ``qcompile CKPT.pth.tar --target max78000 -o OUT.pth.tar``.
    """
    from qcompiler.api import CompileConfig, compile_model
    from qcompiler.targets import TargetConfig

    if is_checkpoint(model):
        onnx_only = given_flags(("--calib", calib), ("--eval", eval_data))
        if onnx_only:
            _fail(QCompilerError(f"{onnx_only[0]} is not used with a checkpoint ({model.name}: quantize.py mode "
                                 "takes its ranges from the trained weights)"), debug, EXIT_BAD_INPUT)
        _run(debug, quantize_checkpoint, model, target, out, config_file, clip_method, qat_weight_bits, scale,
             stddev, device, verbose)
        return
    checkpoint_only = given_flags(
        ("--config-file", config_file), ("--clip-method", clip_method), ("--qat-weight-bits", qat_weight_bits),
        ("--scale", scale), ("--stddev", stddev), ("--device", None if device == "MAX78000" else device),
        ("--verbose", verbose or None))
    if checkpoint_only:
        _fail(QCompilerError(f"{checkpoint_only[0]} belongs to quantize.py mode (a .pth.tar checkpoint as MODEL); "
                             f"{model.name} is compiled from ONNX, where the target writes the network YAML"),
              debug, EXIT_BAD_INPUT)

    if calib is None:
        _fail(QCompilerError("--calib DATA is required: activation ranges come from calibration data"), debug, EXIT_BAD_INPUT)
    out_dir = out if out is not None else Path("out") / f"{model.stem}-{target}"
    config = CompileConfig(
        calib=calib,
        eval=eval_data,
        target=TargetConfig(
            weight_bits=weight_bits,
            activation_bits=activation_bits,
            per_channel=not per_tensor,
            range_method=calib_method,
            percentile=percentile,
            avg_bits=avg_bits,
            total_bytes=total_bytes,
            allocator=allocator,
            allocate_scope=allocate_scope,
            profile_mode=profile_mode,
            profile_from=str(profile_from) if profile_from is not None else None,
            fl_rule=fl_rule,
            max_loss=max_loss,
            keep_float=tuple(split_list(keep_float)),
            native_int4=native_int4,
        ),
        batch_size=batch_size,
        dump_ir=dump_ir,
        show_progress=not quiet,
        tune_between_cuts=tune_cuts,
    )

    def checked() -> Any:
        if weight_bits < 1 or activation_bits < 2 or batch_size < 1:
            raise QCompilerError("--weight-bits must be >= 1, --activation-bits >= 2 and --batch-size >= 1")
        if calib_method not in ("minmax", "percentile", "entropy", "mse"):
            raise QCompilerError(f"--calib-method {calib_method!r} is not one of minmax, percentile, entropy, mse")
        if not 0.0 < percentile <= 100.0:
            raise QCompilerError(f"--percentile {percentile} is not in (0, 100]")
        from qcompiler.passes.allocate_bits import METHODS

        if allocator not in (*METHODS, "greedy"):
            raise QCompilerError(f"--allocator {allocator!r} is not one of {', '.join(METHODS)}")
        from qcompiler.passes.assign_fixed_point import FL_RULES

        if fl_rule not in FL_RULES:
            raise QCompilerError(f"--fl-rule {fl_rule!r} is not one of {', '.join(FL_RULES)}")
        if allocate_scope not in ("weights", "all"):
            raise QCompilerError(f"--allocate {allocate_scope!r} is not one of weights, all")
        if profile_mode not in ("exact", "fast", "hybrid"):
            raise QCompilerError(f"--profile-mode {profile_mode!r} is not one of exact, fast, hybrid")
        if max_loss is not None and not 0.0 <= max_loss < 1.0:
            raise QCompilerError(f"--max-loss {max_loss} is not a fraction in [0, 1)")
        if (avg_bits is not None and avg_bits <= 0) or (total_bytes is not None and total_bytes <= 0):
            raise QCompilerError("--avg-bits and --total-bytes must be positive")
        nonlocal config
        if pipeline is not None:
            given = given_flags(("--avg-bits", avg_bits), ("--total-bytes", total_bytes), ("--max-loss", max_loss),
                                ("--gpfq", gpfq or None), ("--tune-cuts", tune_cuts or None))
            if given:
                raise QCompilerError(f"--pipeline describes the passes: put {given[0]} into it instead "
                                     "(e.g. allocate(avg_bits=4), gpfq(bits=4))")
            return compile_model(model, target, dataclasses.replace(config, pipeline=pipeline, finetune_data=finetune_data),
                                 out_dir)
        if finetune_data is not None:
            from qcompiler.passes.finetune import FineTunePass

            config = dataclasses.replace(config, finetune=FineTunePass(
                data=finetune_data, epochs=epochs, lr=finetune_lr, optimizer=finetune_optimizer,
                schedule=finetune_schedule, distill=finetune_distill, distill_weight=finetune_distill_weight,
                patience=finetune_patience,
                batch_size=min(batch_size, 64), show_progress=not quiet))
        if gpfq:
            from qcompiler.passes.gpfq import GPFQPass

            rewrite = GPFQPass(bits=weight_bits, scalar=gpfq_scalar, samples=gpfq_samples, rounding=gpfq_rounding,
                               bias_correction=gpfq_bias_correction, skip=split_list(gpfq_skip),
                               token_mask=gpfq_token_mask, target_inputs=gpfq_target_inputs, damping=gpfq_damping,
                               cache_mb=gpfq_cache_mb)
            return compile_model(model, target, dataclasses.replace(config, gpfq=rewrite), out_dir)
        return compile_model(model, target, config, out_dir)

    result = _run(debug, checked)
    if not quiet:
        _print_summary(result)


@app.command("inspect")
def inspect_command(
    model: Path = typer.Argument(..., help="The model (.onnx)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the answer as JSON to this file."),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Quantizable layers, parameter counts, op histogram and what each target supports (no data needed)."""
    from qcompiler.fsutil import write_json
    from qcompiler.inspection import inspect_model

    info = _run(debug, inspect_model, model)
    if json_out is not None:
        _run(debug, write_json, json_out, info)
    _print_inspection(info)


def _print_inspection(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    ins = ", ".join(f"{v['name']} {v['shape']}" for v in info["inputs"])
    console.print(f"[bold]{info['model']}[/bold]: {info['nodes']} nodes, {info['parameters']:,} parameters "
                  f"({info['float32_bytes'] / 1024:.1f} KiB float32), inputs {ins}")
    table = Table(title=f"{len(info['layers'])} quantizable layers, {info['quantizable_parameters']:,} parameters")
    table.add_column("node", **_name_column([row["node"] for row in info["layers"]]))
    for column in ("op", "weight shape", "params", "output shape"):
        table.add_column(column, justify="right" if column == "params" else "left")
    for row in info["layers"]:
        table.add_row(row["node"], row["op"], str(row["weight_shape"]), f"{row['params']:,}", str(row["output_shape"]))
    console.print(table)
    console.print("ops: " + ", ".join(f"{op}×{n}" for op, n in info["ops"].items()))
    for name, verdict in info["targets"].items():
        if verdict["supported"]:
            extra = f" ({verdict['hardware_layers']} hardware layers)" if "hardware_layers" in verdict else ""
            console.print(f"target {name}: [green]supported[/green]{extra}")
        elif "float_only_ops" in verdict:
            ops = ", ".join(f"{op}×{n}" for op, n in verdict["float_only_ops"].items())
            console.print(f"target {name}: [yellow]needs float ops[/yellow] {ops}; {verdict['hint']}")
        else:
            console.print(f"target {name}: [red]not supported[/red]: {verdict['reason']}")


@app.command("profile")
def profile_command(
    model: Path = typer.Argument(..., help="The float model (.onnx)."),
    calib: Path = typer.Option(..., "--calib", help="Calibration data (.npz keyed by input name, or .npy)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    mode: str = typer.Option("exact", "--mode", help="exact, fast, or both (measures and compares)."),
    bits: str = typer.Option("1,2,3,4,5,6,7,8,16", "--bits", help="Candidate bit widths, comma-separated."),
    kinds: str = typer.Option("uniform,deadzone,log,fixed", "--kinds", help="Quantizer kinds, comma-separated; none adds the not-quantized candidate (float32)."),
    ratios: str = typer.Option("0.1,0.3,0.5", "--deadzone-ratios", help="Dead-zone ratios, comma-separated."),
    levels: Optional[str] = typer.Option(None, "--deadzone-levels", help="Dead-zone level counts L instead of 2^b-1 (seed 000's adaptive_list_quant_levels): comma-separated, or @FILE with one L per line."),
    export_pareto: bool = typer.Option(False, "--export-pareto-inputs", help="Also write seed 000's pareto_condition_inputs.txt (dead-zone points)."),
    tensors: str = typer.Option("all", "--tensors", help="all, weights or activations."),
    batch_size: int = typer.Option(64, "--batch-size"),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the PNG plots."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Measure rate-distortion curves of every weight and activation; export JSON and plots."""
    from qcompiler.candidates import candidate_set
    from qcompiler.profiling import ProfileConfig, profile_model

    def run() -> Any:
        try:
            candidates = candidate_set(
                bits=tuple(int(b) for b in bits.split(",")),
                kinds=tuple(k.strip() for k in kinds.split(",")),
                deadzone_ratios=tuple(float(r) for r in ratios.split(",")),
                deadzone_levels_list=level_list(levels) if levels else (),
            )
        except ValueError as exc:
            raise QCompilerError(f"bad candidate options: {exc}") from None
        if tensors not in ("all", "weights", "activations"):
            raise QCompilerError(f"--tensors {tensors!r} is not one of all, weights, activations")
        config = ProfileConfig(calib=calib, mode=mode, candidates=tuple(candidates), tensors=tensors,
                               batch_size=batch_size, plots=not no_plots, show_progress=not quiet,
                               export_pareto_inputs=export_pareto)
        return profile_model(model, config, out)

    report = _run(debug, run)
    if not quiet:
        # candidates = bit widths x kinds (x dead-zone ratios), plus any explicit level counts
        candidates = max((len(p["rows"]) for t in report["tensors"].values() for p in t.values() if "rows" in p),
                         default=0)
        typer.echo(f"profiled {len(report['tensors'])} tensors x {candidates} candidates -> {out}/")
        if "fast_vs_exact" in report:
            fv = report["fast_vs_exact"]
            typer.echo(f"fast vs exact: mean Spearman {fv['mean_spearman']:.3f}, median relative error {fv['median_relative_error']:.3f}")


def level_list(text: str) -> tuple[int, ...]:
    """Level counts from ``"3,5,7"`` or ``"@FILE"`` (numbers separated by commas or whitespace).

    Raises:
        QCompilerError: an unreadable file or a value that is not an integer.
    """
    source = text
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            text = path.read_text()
        except OSError as exc:
            raise QCompilerError(f"{path}: cannot read the level list ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise QCompilerError(f"{path}: the level list is not a text file") from None
    try:
        return tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise QCompilerError(f"--deadzone-levels {source!r}: expected integers separated by commas or white space") from None


@app.command("allocate")
def allocate_command(
    inputs: Path = typer.Argument(..., help="Seed 000's pareto_condition_inputs.txt (or qcompile profile --export-pareto-inputs)."),
    avg_bits: str = typer.Option(..., "--avg-bits", help="Budgets b̄ in bits per element: b1,b2,... or start:stop:step (e.g. 1.5:16:0.1)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: bit_allocation_{10·b̄}.txt per budget, allocations.json."),
    allocator: str = typer.Option("knapsack", "--allocator", help="knapsack, pareto, pareto-faithful, hull or hull-fill."),
    max_point_error: Optional[float] = typer.Option(None, "--max-point-error", help="Drop points with D above this first (the seed drops D > 1)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Apply every allocation to this model (the one profiled) and measure it (seed step 6); needs --calib."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="With --model: calibration data (the activations' dead zones are fitted on it)."),
    eval_data: Optional[Path] = typer.Option(None, "--eval", help="With --model: data to measure on (logit MSE, top-1 with labels); default --calib."),
    batch_size: int = typer.Option(64, "--batch-size"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Seed 000's steps 5-6: allocate a curve file for a list of budgets, one bit_allocation file
    each; with --model, apply and measure every allocation."""
    from qcompiler.pareto_files import SeedEvaluation, parse_budgets, run_seed_allocation

    def run() -> Any:
        if allocator not in ("knapsack", "pareto", "pareto-faithful", "hull", "hull-fill"):
            raise QCompilerError(f"--allocator {allocator!r} is not one of knapsack, pareto, pareto-faithful, hull, hull-fill")
        if (model is None) != (calib is None) or (eval_data is not None and model is None):
            raise QCompilerError("--model and --calib go together (and --eval needs them)")
        evaluation = SeedEvaluation(model, calib, eval_data, batch_size) if model is not None else None
        return run_seed_allocation(inputs, parse_budgets(avg_bits), out, allocator, max_point_error, evaluation)

    rows = _run(debug, run)
    if not quiet:
        for row in rows:
            if "error" in row:
                typer.echo(f"{row['avg_bits']:g} bits: skipped, {row['error']}")
                continue
            measured = f", measured {row['measured_distortion']:.6g}" if "measured_distortion" in row else ""
            top1 = f", top-1 {row['top1']:.4f}" if "top1" in row else ""
            typer.echo(f"{row['avg_bits']:g} bits: {row['file']} (rate {row['rate_per_element']:.4f} bits/element, "
                       f"sum of D {row['distortion']:.6g}{measured}{top1})")


@app.command("channels")
def channels_command(
    model: Path = typer.Argument(..., help="The float model (.onnx)."),
    tensor: str = typer.Option(..., "--tensor", help="The feature tensor to allocate (a split point)."),
    calib: Path = typer.Option(..., "--calib", help="Calibration data for the offline table."),
    eval_data: Optional[Path] = typer.Option(None, "--eval", help="Evaluation data (default: --calib)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    quantizer: str = typer.Option("uniform", "--quantizer", help="uniform, log or log_faithful."),
    alpha: float = typer.Option(0.9, "--alpha", help="Mean priority of the online score."),
    beta: float = typer.Option(0.1, "--beta", help="Spread priority of the online score."),
    reserve: int = typer.Option(10, "--reserve-interval", help="Intervals kept for online refinement."),
    table_samples: int = typer.Option(32, "--table-samples"),
    eval_samples: int = typer.Option(128, "--eval-samples"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Channel-wise interval allocation for one feature (seed 001): mse.csv and channels.json."""
    from qcompiler.channels_cli import run_channels

    def run() -> Any:
        return run_channels(model, tensor, calib, eval_data, out, quantizer, alpha, beta, reserve,
                            table_samples, eval_samples)

    rows = _run(debug, run)
    if not quiet:
        typer.echo("bits,uniform,allocated,closed_form,dorefa")
        for row in rows:
            typer.echo(",".join(f"{v:.6g}" for v in row))


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in split_list(text))
    except ValueError:
        raise QCompilerError(f"{option} {text!r}: expected comma-separated numbers") from None


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in split_list(text))
    except ValueError:
        raise QCompilerError(f"{option} {text!r}: expected comma-separated integers") from None


@app.command("gpfq")
def gpfq_command(
    model: Path = typer.Argument(..., help="The float model (.onnx)."),
    calib: Path = typer.Option(..., "--calib", help="Calibration data (.npz keyed by input name)."),
    eval_data: Path = typer.Option(..., "--eval", help="Held-out data with 'labels' (top-1/top-5)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: quantized models, gpfq_log.csv, sweep.json."),
    bits: str = typer.Option("4", "-b", "--bits", help="Bit widths, comma-separated."),
    samples: str = typer.Option("", "-bs", "--batch_size", help="Calibration samples per layer, comma-separated (default all)."),
    scalar: str = typer.Option("1.16", "-s", "--scalar", help="Alphabet scalars C, comma-separated."),
    linear_scalar: str = typer.Option("", "--linear-scalar", help="Alphabet scalars of linear layers (default: -s)."),
    percentile: str = typer.Option("1", "-p", "--percentile", help="Row quantiles of |W| for the radius (1 = max)."),
    stochastic: bool = typer.Option(False, "-sq", "--stochastic", help="Stochastic rounding (SGPFQ)."),
    regularizer: Optional[str] = typer.Option(None, "-reg", "--regularizer", help="L0 or L1."),
    lambdas: str = typer.Option("0.1", "-l", "--lambda", help="Regulariser thresholds, comma-separated."),
    ignore: str = typer.Option("", "-ig", "--ignore", help="Layers to skip: indices or node names, comma-separated."),
    grid: str = typer.Option("int", "--grid", help="int (2^b levels, per channel), reference (2^b+1 levels) or paper2022."),
    bias_correction: str = typer.Option("none", "--bias-correction", help="none, last or all."),
    seed: int = typer.Option(0, "-seed", "--seed", help="RNG seed."),
    dataset: str = typer.Option("", "-ds", "--dataset", help="Data set name for the log (default: the --eval file)."),
    log: Optional[Path] = typer.Option(None, "--log", help="Also append the rows to this CSV log."),
    batch_size: int = typer.Option(64, "--batch", help="Streaming batch size."),
    no_models: bool = typer.Option(False, "--no-models", help="Do not write the quantized models."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """GPFQ the way seed 004's main.py runs it: every combination of the lists, one CSV row each."""
    from qcompiler.gpfq_sweep import SweepConfig, run_sweep

    def run() -> Any:
        sizes = _ints(samples, "-bs")
        config = SweepConfig(
            bits=_ints(bits, "-b"), scalars=_floats(scalar, "-s"),
            linear_scalars=_floats(linear_scalar, "--linear-scalar") or None,
            samples=sizes or (None,), percentiles=_floats(percentile, "-p"), lambdas=_floats(lambdas, "-l"),
            regularizer=regularizer, stochastic=stochastic, grid=grid,
            skip=tuple(int(v) if v.isdigit() else v for v in split_list(ignore)),
            bias_correction=bias_correction, seed=seed, batch_size=batch_size, dataset=dataset,
            write_models=not no_models,
        )
        if not config.bits or not config.scalars:
            raise QCompilerError("-b and -s need at least one value each")
        if grid not in ("int", "reference", "paper2022"):
            raise QCompilerError(f"--grid {grid!r} is not one of int, reference, paper2022")
        return run_sweep(model, calib, eval_data, out, config, log, show_progress=not quiet)

    rows = _run(debug, run)
    if not quiet:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"GPFQ sweep ({len(rows)} runs) -> {out}/gpfq_log.csv")
        for col in ("bits", "C", "bs", "float top-1", "GPFQ top-1", "RTN top-1", "GPFQ MSE", "RTN MSE", "s"):
            table.add_column(col, justify="right")
        for row in rows:
            table.add_row(str(row["Bits"]), f"{row['CNN_Alphabet_Scalar']:g}", str(row["Quantization Batch Size"]),
                          f"{row['Original Top1 Accuracy']:.4f}", f"{row['Quantized Top1 Accuracy']:.4f}",
                          f"{row['RTN Top1 Accuracy']:.4f}", f"{row['GPFQ Output MSE']:.4g}",
                          f"{row['RTN Output MSE']:.4g}", f"{row['Quantization Seconds']:.1f}")
        Console().print(table)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"qcompile {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Print the version."),
) -> None:
    """qcompiler: compile a float ONNX model into a quantized, validated integer model."""


def main() -> None:
    """Console-script entry point."""
    app(prog_name="qcompile")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
