# The README's two commands: `make demo` and `make test`. Each sets up .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo

$(PY):
	python3 -m venv $(VENV)

# torch==2.13.0 only when no torch is importable: a user's existing (CUDA) torch is kept, and a bare
# range would pull a multi-GB CUDA build. Never an eager upgrade.
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

# The demo (synthqa/demo.py): the batch job on generated synthetic clips (one broken) with models/synth,
# the whole Ray pipeline, VisionZip on; predictions printed beside the ground truth.
demo: $(STAMP)
	$(PY) -m synthqa.demo +experiment=demo
