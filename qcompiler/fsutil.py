"""Atomic file output: write into a temporary sibling, then rename into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qcompiler.errors import OutputError

#: Written into every output folder: a later run may replace a folder that holds it (or an
#: empty one) as a whole, and refuses any other existing folder rather than delete its files.
OUTPUT_MARKER = ".qcompiler-output"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the usual umask mode."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _default_mode(tmp_path, directory=False)
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON with sorted keys, atomically (stable bytes across runs)."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_bytes(path, text.encode())


def write_npy(path: str | os.PathLike[str], array: Any) -> None:
    """Write one array as ``.npy``, atomically."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_bytes(path, buffer.getvalue())


def write_npz(path: str | os.PathLike[str], **arrays: Any) -> None:
    """Write named arrays as an uncompressed ``.npz`` (stable bytes), atomically."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **{k: arrays[k] for k in sorted(arrays)})
    write_bytes(path, buffer.getvalue())


def check_output_dir(path: str | os.PathLike[str]) -> None:
    """Refuse an output folder path that :func:`atomic_dir` could not replace harmlessly.

    Raises:
        OutputError: ``path`` is a file, or a non-empty folder without :data:`OUTPUT_MARKER`
            (a folder qcompiler did not write: replacing it would delete the user's files).
    """
    final = Path(path)
    if not final.exists():
        _check_writable(final)
        return
    if not final.is_dir():
        raise OutputError(f"{path}: exists and is not a folder; give a folder path for the outputs")
    if (final / OUTPUT_MARKER).exists() or not any(final.iterdir()):
        return
    raise OutputError(
        f"{path}: folder exists and was not written by qcompiler (no {OUTPUT_MARKER}); outputs replace "
        "their folder as a whole, so give a new or empty folder"
    )


def _check_writable(final: Path) -> None:
    """OutputError unless a folder can be created where ``final`` will be (probed in its
    nearest existing ancestor, so a long run does not fail only when it writes)."""
    ancestor = final.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".qcompiler-probe.", dir=ancestor))
    except OSError as exc:
        raise OutputError(f"{final}: cannot write there ({ancestor}: {exc.strerror or exc})") from None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces ``path`` as a whole.

    On failure the temporary folder is removed and ``path`` is left as it was, so a failed run
    never leaves a half-written output folder. An existing ``path`` is replaced only after the
    new content is complete, and only if qcompiler wrote it or it is empty
    (:func:`check_output_dir`).

    Raises:
        OutputError: see :func:`check_output_dir`.
    """
    check_output_dir(path)
    final = Path(path).resolve()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    except OSError as exc:
        raise OutputError(f"{path}: cannot write there ({exc.strerror or exc})") from None
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text("written by qcompiler; the next run that writes here replaces this folder\n")
        _default_mode(tmp, directory=True)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old / "content")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
