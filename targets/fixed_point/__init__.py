"""The generic fixed-point target (``--target fixed-point``)."""

from qcompiler.targets.fixed_point.target import FixedPointTarget

__all__ = ["FixedPointTarget"]
