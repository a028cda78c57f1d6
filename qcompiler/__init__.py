"""qcompiler: a quantization compiler for neural networks.

Models are lowered to an ONNX graph IR (``onnx_ir``); passes annotate and rewrite it; targets
emit artifacts validated with onnxruntime. The Python API lives in :mod:`qcompiler.api`; the
passes in :mod:`qcompiler.passes` and the targets in :mod:`qcompiler.targets`.
"""

__version__ = "0.1.0"
