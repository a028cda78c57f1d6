"""``qcompile channels``: seed 001's channel-wise allocation for a named feature, exported."""

from __future__ import annotations

from pathlib import Path

from qcompiler import annotations as ann
from qcompiler.data import load_dataset
from qcompiler.errors import QCompilerError
from qcompiler.fsutil import atomic_dir, check_output_dir, write_bytes, write_json
from qcompiler.graph import values_by_name
from qcompiler.ir import load_normalized, save
from qcompiler.passes.channel_allocation import ChannelAllocationPass
from qcompiler.passes.pipelines import canonical_pipeline
from qcompiler.pipeline import run_pipeline


def run_channels(
    model_path: Path, tensor: str, calib: Path, eval_data: Path | None, out: Path, quantizer: str,
    alpha: float, beta: float, reserve: int, table_samples: int, eval_samples: int,
) -> list[tuple[float, ...]]:
    """Run the allocation; write ``mse.csv`` (the seed's report), ``channels.json`` and the IR."""
    check_output_dir(out)
    model = load_normalized(model_path)
    data = load_dataset(calib, model)
    held_out = load_dataset(eval_data, model) if eval_data is not None else None
    try:
        allocation = ChannelAllocationPass(data=data, tensor=tensor, eval_data=held_out, quantizer=quantizer,
                                           alpha=alpha, beta=beta, reserve=reserve,
                                           table_samples=table_samples, eval_samples=eval_samples)
    except ValueError as exc:
        raise QCompilerError(str(exc)) from None
    result = run_pipeline(model, [*canonical_pipeline(), allocation]).model
    found = ann.require(values_by_name(result.graph)[tensor], ann.ChannelAllocation)
    rows = [
        (float(b), u, a, c, d)
        for b, u, a, c, d in zip(found.bits, found.mse_uniform, found.mse_allocated, found.mse_closed_form, found.mse_dorefa)
    ]
    with atomic_dir(out) as folder:
        csv = "bits,uniform,allocated,closed_form,dorefa\n" + "".join(
            f"{int(r[0])},{r[1]!r},{r[2]!r},{r[3]!r},{r[4]!r}\n" for r in rows
        )
        write_bytes(folder / "mse.csv", csv.encode())
        write_json(folder / "channels.json", {"tensor": tensor, **ann.dump(result)["values"][tensor]})
        save(result, folder / "model.channels.onnx")
    return rows
