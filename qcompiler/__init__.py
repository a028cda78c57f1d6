"""qcompiler: a quantization compiler for neural networks.

Models are lowered to an ONNX graph IR (``onnx_ir``); passes annotate and rewrite it; targets
emit artifacts validated with onnxruntime. The Python API lives in :mod:`qcompiler.api`; the
passes in :mod:`qcompiler.passes` and the targets in :mod:`qcompiler.targets`.
"""

import os

# OpenMP workers (numba's statistics kernels; torch's intra-op pool) spin for milliseconds after
# each parallel region by default and take the cores that onnxruntime's next run needs: digits
# calibration measured 24 ms per onnxruntime run instead of 15 (bench/RESULTS.md, issue 3).
# Passive workers sleep instead. libgomp reads the variable once, when it loads, so it is set
# here, before numba or torch load it; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
