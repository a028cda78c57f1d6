"""Target backends, installed as ``qcompiler.targets`` (source folder ``targets/``)."""

from __future__ import annotations

from qcompiler.errors import QCompilerError
from qcompiler.targets.base import Artifact, Target, TargetConfig
from qcompiler.targets.fixed_point import FixedPointTarget
from qcompiler.targets.max78000.target import Max78000Target

#: The explicit registry of targets by CLI name.
TARGETS: dict[str, type] = {FixedPointTarget.name: FixedPointTarget, Max78000Target.name: Max78000Target}


def get_target(name: str) -> Target:
    """Instantiate the target called ``name``.

    Raises:
        QCompilerError: unknown target, listing the known ones.
    """
    try:
        return TARGETS[name]()
    except KeyError:
        raise QCompilerError(f"unknown target {name!r} (known: {', '.join(sorted(TARGETS))})") from None


__all__ = ["TARGETS", "Artifact", "Target", "TargetConfig", "get_target"]
