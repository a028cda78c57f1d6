"""Safe loading and deterministic saving of ai8x / distiller PyTorch checkpoints (max78000.md §1.9, §2).

Training checkpoints pickle ``optimizer_type``, a class object such as ``torch.optim.sgd.SGD``,
which ``torch.load(weights_only=True)`` refuses. ``weights_only=False`` would execute arbitrary
pickle code, so it is never used: the optimizer-class globals are resolved to an inert stub
instead, and any other global is refused with the names it asked for.
"""

from __future__ import annotations

import io
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

from qcompiler.errors import CheckpointError
from qcompiler.fsutil import write_bytes

#: Pickled globals the safe loader may stub out: optimizer classes, nothing else.
OPTIMIZER_GLOBAL = re.compile(r"^torch\.optim\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+$")
#: Top-level keys the project writes (everything else of a training checkpoint is dropped).
KEPT_KEYS = ("epoch", "arch", "state_dict", "extras")


def require_torch() -> Any:
    """Import torch, or raise a one-line CheckpointError naming the extra to install."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is installed with the max78000 extra
        raise CheckpointError(
            "PyTorch checkpoints need torch: pip install 'qcompiler[torch]'"
        ) from None
    return torch


class InertGlobal:
    """Stands in for a pickled optimizer class; it can never be instantiated or called."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise CheckpointError("a stubbed optimizer class from a checkpoint cannot be used")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint without executing pickled code.

    Args:
        path: a ``.pth.tar`` file written by ``torch.save``.

    Returns:
        The checkpoint dictionary; ``optimizer_type`` (a stubbed class) is removed.

    Raises:
        CheckpointError: unreadable file, a global that is not an optimizer class, no ``state_dict``.
    """
    torch = require_torch()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        checkpoint = _load_with_stubbed_optimizers(torch, path)
    except Exception as exc:  # torch raises RuntimeError/EOFError/zip errors for non-checkpoints
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: no 'state_dict' in checkpoint")
    checkpoint.pop("optimizer_type", None)
    return checkpoint


def _load_with_stubbed_optimizers(torch: Any, path: Path) -> dict[str, Any]:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from None
    refused = sorted(name for name in names if not OPTIMIZER_GLOBAL.match(name))
    if refused:
        raise CheckpointError(
            f"{path}: refused to unpickle global(s) {', '.join(refused)} "
            "(rule: only tensors, containers and optimizer classes are loaded; nothing is executed)"
        )
    with torch.serialization.safe_globals([(InertGlobal, name) for name in names]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{path}: cannot be loaded safely ({type(exc).__name__}: {exc})"
            ) from None


def plain_extras(extras: Any) -> dict[str, Any]:
    """Keep the ``str``/``int``/``float``/``bool`` entries so that the file loads with weights_only."""
    if not isinstance(extras, dict):
        return {}
    return {
        k: v
        for k, v in extras.items()
        if isinstance(k, str) and isinstance(v, (str, int, float, bool))
    }


def checkpoint_bytes(checkpoint: dict[str, Any]) -> bytes:
    """Serialise ``{'epoch', 'arch', 'state_dict', 'extras'}`` with ``torch.save`` (zip format).

    Saving into memory keeps the archive's inner folder name fixed ("archive"), so identical
    content gives identical bytes whatever the destination file is called.
    """
    torch = require_torch()
    kept = {key: checkpoint[key] for key in KEPT_KEYS if key in checkpoint}
    kept["state_dict"] = OrderedDict(kept.get("state_dict", {}))
    kept["extras"] = plain_extras(kept.get("extras"))
    buffer = io.BytesIO()
    torch.save(kept, buffer)
    return buffer.getvalue()


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Write a checkpoint atomically (see :func:`checkpoint_bytes`)."""
    write_bytes(path, checkpoint_bytes(checkpoint))
