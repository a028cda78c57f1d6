"""Loading, normalising and saving the IR (``onnx_ir.Model``).

- :func:`load` accepts a path, raw bytes, an ``onnx.ModelProto`` or an ``onnx_ir.Model``.
- :func:`normalize` makes a model fit for the passes: opset >= 13, unique names, a stable
  topological order and inferred shapes.
- :func:`save` writes atomically; models over 2 GB get an external-data file.

External-data locations are checked before anything is read: a location that resolves
outside the model's folder (``../secret``, an absolute path, a symlink out) is refused.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from google.protobuf.message import DecodeError

from qcompiler.errors import ModelLoadError, UnsupportedModelError

#: The lowest default-domain opset the passes work with (per-channel Q/DQ needs 13).
MIN_OPSET = 13
#: Protobuf's hard limit; larger models must keep their tensors in an external file.
PROTOBUF_LIMIT = 2**31 - 1
#: Above this many initializer bytes, :func:`save` writes external data (headroom for graph).
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26

ModelLike = str | os.PathLike[str] | bytes | onnx.ModelProto | ir.Model


def load(source: ModelLike) -> ir.Model:
    """Load a model into the IR without normalising it.

    Args:
        source: a file path, serialized bytes, an ``onnx.ModelProto`` or an ``onnx_ir.Model``
            (returned as is).

    Raises:
        ModelLoadError: missing file, not an ONNX model, or unsafe external data.
    """
    if isinstance(source, ir.Model):
        return source
    if isinstance(source, onnx.ModelProto):
        return ir.from_proto(source)
    if isinstance(source, (bytes, bytearray)):
        proto = _parse(bytes(source), "<bytes>")
        _check_no_external_data(proto, "<bytes>")
        return ir.from_proto(proto)
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    # The protobuf without its external data is small; parse it first to refuse non-ONNX files
    # and unsafe external-data locations before onnx_ir touches any other file.
    header = _parse(path.read_bytes(), str(path))
    check_external_data_paths(header, path.parent)
    try:
        return ir.load(path)
    except Exception as exc:  # onnx_ir raises various types for broken files
        raise ModelLoadError(f"{path}: cannot be read as ONNX ({exc})") from exc


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{where}: not an ONNX model ({exc})") from None
    if not proto.HasField("graph") or not proto.opset_import:
        raise ModelLoadError(f"{where}: not an ONNX model (no graph or opset_import)")
    return proto


def _external_locations(proto: onnx.ModelProto) -> list[tuple[str, str]]:
    """(tensor name, location) of every tensor stored externally, subgraphs included."""
    out = []
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            out.append((tensor.name, info.get("location", "")))
    return out


def check_external_data_paths(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external-data locations that leave ``base_dir``.

    Raises:
        ModelLoadError: naming the tensor and the location.
    """
    base = base_dir.resolve()
    for name, location in _external_locations(proto):
        if not location or os.path.isabs(location):
            raise ModelLoadError(
                f"tensor {name!r}: external data location {location!r} must be a relative path "
                "inside the model's folder"
            )
        target = (base / location).resolve()
        if base != target and base not in target.parents:
            raise ModelLoadError(
                f"tensor {name!r}: external data location {location!r} points outside the "
                f"model's folder {base}"
            )
        if not target.is_file():
            raise ModelLoadError(f"tensor {name!r}: external data file {target} does not exist")


def _check_no_external_data(proto: onnx.ModelProto, where: str) -> None:
    if _external_locations(proto):
        raise ModelLoadError(f"{where}: a model with external data must be loaded from its path")


def default_opset(model: ir.Model) -> int:
    """The model's default-domain ('' / ai.onnx) opset version."""
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if version is None:
        raise UnsupportedModelError("model imports no default-domain (ai.onnx) opset")
    return version


def upgrade_opset(model: ir.Model, target: int = MIN_OPSET) -> ir.Model:
    """Return the model converted to ``target`` if its default opset is lower, else the model.

    Raises:
        UnsupportedModelError: the ONNX version converter cannot convert it.
    """
    if default_opset(model) >= target:
        return model
    proto = ir.to_proto(model)
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as exc:
        raise UnsupportedModelError(
            f"cannot upgrade the model from opset {default_opset(model)} to {target}: {exc}"
        ) from exc
    return ir.from_proto(converted)


def normalize(model: ir.Model, min_opset: int = MIN_OPSET) -> ir.Model:
    """Opset upgrade, unique names, topological order and shape inference.

    Returns the (possibly new) model. Annotations in ``metadata_props`` are preserved.
    """
    model = upgrade_opset(model, min_opset)
    common_passes.NameFixPass()(model)
    common_passes.TopologicalSortPass()(model)
    try:
        common_passes.ShapeInferencePass(strict_mode=False)(model)
    except Exception as exc:  # shape inference is an aid, never a reason to refuse a model
        raise UnsupportedModelError(f"shape inference failed: {exc}") from exc
    return model


def load_normalized(source: ModelLike) -> ir.Model:
    """:func:`load` followed by :func:`normalize`."""
    return normalize(load(source))


def initializer_bytes(model: ir.Model) -> int:
    """Total size of the model's initializers in bytes."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)


def save(
    model: ir.Model,
    path: str | os.PathLike[str],
    external_data: bool | None = None,
    size_threshold_bytes: int = 1024,
) -> None:
    """Save atomically: write into a temporary folder beside ``path``, then rename into place.

    Args:
        model: the model.
        path: destination ``.onnx`` file.
        external_data: True forces ``<name>.data`` beside the model, False forbids it, None
            (default) uses it only when the initializers exceed the 2 GB protobuf limit.
        size_threshold_bytes: with external data, smaller tensors stay inside the model file.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = final.name + ".data"
    with tempfile.TemporaryDirectory(prefix=f".{final.name}.", dir=final.parent) as tmp:
        tmp_model = Path(tmp) / final.name
        if external_data:
            ir.save(model, tmp_model, external_data=data_name, size_threshold_bytes=size_threshold_bytes)
            os.replace(Path(tmp) / data_name, final.parent / data_name)
        else:
            ir.save(model, tmp_model)
        os.replace(tmp_model, final)


def to_bytes(model: ir.Model) -> bytes:
    """Serialize an in-memory model (under 2 GB) to bytes, e.g. for an onnxruntime session."""
    return ir.to_proto(model).SerializeToString()
