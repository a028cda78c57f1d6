# qcompiler: `make run` sets up and compiles the shipped example; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test example bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip "setuptools>=68" wheel
	# torch first, pinned: this machine has the 2.13.0 CPU build on disk; unpinned pulls CUDA.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[examples,test]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/qcompile examples/digits/digits_cnn.onnx --target max78000 \
		--calib examples/digits/calib.npz --eval examples/digits/eval.npz -o out/digits-max78000

test: $(STAMP)
	$(BIN)/python -m pytest -q

example: $(STAMP)
	$(BIN)/python examples/digits/train.py

clean:
	rm -rf out build dist *.egg-info
