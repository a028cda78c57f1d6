"""Calibration and evaluation data: loading, validation against the model, batching.

A data set is a set of arrays keyed by the model's input names (``.npz``), a single array for
a one-input model (``.npy``), an in-memory mapping, or any iterable of feed dicts (e.g. built
from a torch DataLoader). An ``.npz`` may also hold ``labels`` (int, one per sample) for
accuracy. Every array is checked against the model's inputs: names, dtypes, static dimensions,
equal sample counts, no NaN or Inf. Batches are views: nothing is copied per sample.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompiler.errors import DataError

LABELS_KEY = "labels"


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """Arrays keyed by input name, plus optional labels; iterated in batches.

    Attributes:
        arrays: input name -> array with the samples on axis 0.
        labels: int labels (one per sample), or None.
        source: where the data came from, for messages.
    """

    arrays: Mapping[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = "<memory>"

    @property
    def num_samples(self) -> int:
        """Number of samples (axis 0 of every array)."""
        return int(next(iter(self.arrays.values())).shape[0])

    def batches(self, batch_size: int = 64) -> Iterator[dict[str, np.ndarray]]:
        """Feed dicts of at most ``batch_size`` samples, in order."""
        for start in range(0, self.num_samples, batch_size):
            yield {k: v[start : start + batch_size] for k, v in self.arrays.items()}

    def take(self, n: int) -> ArrayDataset:
        """The first ``n`` samples."""
        labels = None if self.labels is None else self.labels[:n]
        return ArrayDataset({k: v[:n] for k, v in self.arrays.items()}, labels, self.source)


DataSource = str | os.PathLike[str] | Mapping[str, np.ndarray] | ArrayDataset


def _numpy_dtype(value: ir.Value) -> np.dtype:
    if value.dtype is None:
        raise DataError(f"model input {value.name!r} has no element type")
    return np.dtype(value.dtype.numpy())


def _read(path: Path, input_names: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            if len(input_names) != 1:
                raise DataError(
                    f"{path}: a .npy file feeds one input but the model has {len(input_names)} "
                    f"({', '.join(input_names)}); use an .npz keyed by input name"
                )
            return {input_names[0]: array}, None
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read arrays ({' '.join(str(exc).split())})") from None
    labels = arrays.pop(LABELS_KEY, None)
    return arrays, labels


def validate(
    arrays: Mapping[str, np.ndarray], labels: np.ndarray | None, model: ir.Model, source: str
) -> ArrayDataset:
    """Check arrays against the model's inputs; return the data set.

    Raises:
        DataError: naming the file and the offending array.
    """
    inputs = {v.name: v for v in model.graph.inputs if not v.is_initializer()}
    missing = sorted(set(inputs) - set(arrays))
    extra = sorted(set(arrays) - set(inputs))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unknown {extra}")
        raise DataError(
            f"{source}: array names do not match the model inputs {sorted(inputs)} ({'; '.join(parts)})"
        )
    counts = set()
    for name, value in inputs.items():
        array = arrays[name]
        want = _numpy_dtype(value)
        if array.dtype != want:
            raise DataError(f"{source}: array {name!r} has dtype {array.dtype}, the model expects {want}")
        shape = value.shape
        if shape is not None:
            if array.ndim != len(shape):
                raise DataError(
                    f"{source}: array {name!r} has shape {array.shape}, the model expects rank "
                    f"{len(shape)} ({_shape_str(shape)})"
                )
            for axis, (have, dim) in enumerate(zip(array.shape, shape)):
                if axis > 0 and isinstance(dim, int) and have != dim:
                    raise DataError(
                        f"{source}: array {name!r} has shape {array.shape}, the model expects "
                        f"{_shape_str(shape)} (axis {axis})"
                    )
        if array.ndim == 0 or array.shape[0] == 0:
            raise DataError(f"{source}: array {name!r} holds no samples")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise DataError(f"{source}: array {name!r} contains {bad} NaN or Inf values")
        counts.add(array.shape[0])
    if len(counts) > 1:
        raise DataError(f"{source}: arrays have different sample counts {sorted(counts)}")
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(f"{source}: {LABELS_KEY!r} must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        if counts and labels.shape[0] not in counts:
            raise DataError(f"{source}: {labels.shape[0]} labels for {counts.pop()} samples")
    ordered = {name: np.ascontiguousarray(arrays[name]) for name in inputs}
    return ArrayDataset(ordered, labels, source)


def _shape_str(shape: ir.Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def load_dataset(source: DataSource | Iterable[Any], model: ir.Model) -> ArrayDataset:
    """Load and validate data for ``model`` from a path, a mapping, an :class:`ArrayDataset`, or
    an iterable of batches (a torch ``DataLoader``; see :func:`_collect_batches`)."""
    input_names = [v.name for v in model.graph.inputs if not v.is_initializer()]
    if isinstance(source, ArrayDataset):
        return validate(source.arrays, source.labels, model, source.source)
    if isinstance(source, Mapping):
        arrays = dict(source)
        labels = arrays.pop(LABELS_KEY, None)
        return validate(arrays, labels, model, "<memory>")
    if not isinstance(source, (str, os.PathLike)):
        arrays, labels = _collect_batches(source, input_names)
        return validate(arrays, labels, model, "<batches>")
    path = Path(source)
    arrays, labels = _read(path, input_names)
    return validate(arrays, labels, model, str(path))


def _collect_batches(batches: Iterable[Any], input_names: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Concatenate an iterable of batches (e.g. a torch ``DataLoader``): each batch is a feed
    mapping (``labels`` optional) or an ``(inputs, labels)`` pair whose inputs are a mapping or,
    for a one-input model, one array or tensor.

    Raises:
        DataError: an empty iterable or a batch of another form.
    """
    parts: dict[str, list[np.ndarray]] = {}
    for i, batch in enumerate(batches):
        if isinstance(batch, Mapping):
            feed = dict(batch)
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            inputs, labels = batch
            feed = dict(inputs) if isinstance(inputs, Mapping) else ({input_names[0]: inputs} if len(input_names) == 1 else None)
            if feed is None:
                raise DataError(f"batch {i}: a model with inputs {input_names} needs each batch's inputs as a mapping")
            feed[LABELS_KEY] = labels
        else:
            raise DataError(f"batch {i}: expected a feed mapping or an (inputs, labels) pair, got {type(batch).__name__}")
        for name, value in feed.items():
            array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
            parts.setdefault(name, []).append(array)
    if not parts:
        raise DataError("the data iterable yielded no batch")
    arrays = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    return arrays, arrays.pop(LABELS_KEY, None)


def iter_feeds(data: DataSource | Iterable[Mapping[str, np.ndarray]], batch_size: int,
               model: ir.Model | None = None) -> Iterator[Mapping[str, np.ndarray]]:
    """Feed dicts from an :class:`ArrayDataset` (batched), a path or a mapping of arrays (loaded
    and validated against ``model``), or any iterable of feed dicts.

    Raises:
        DataError: a path or mapping without a model to validate it against.
    """
    if isinstance(data, (str, os.PathLike, Mapping)):
        if model is None:
            raise DataError(f"data {data if not isinstance(data, Mapping) else '<memory>'}: load it with load_dataset(source, model)")
        data = load_dataset(data, model)
    if isinstance(data, ArrayDataset):
        yield from data.batches(batch_size)
    else:
        yield from data
