# Two commands do everything: `make demo` and `make test`. Each creates .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# Reinstall when pyproject.toml changes (the stamp's name carries its hash).
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
ARGS ?=

.PHONY: venv demo add-language-demo test test-fast lint format bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m vallex.train.comm_op  # DeepSpeed's CPU op: compiled now (minutes), not silently at the first run
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: venv  ## prepare the embedded demo corpus and train on it (make demo ARGS="train.max_steps=50")
	$(PY) ray_jobs/demo.py --config job.yaml $(ARGS)

add-language-demo: venv  ## base model on en/fr/zh, then add ar naively and with vallex (README: Adding a language)
	$(PY) ray_jobs/add_language.py --demo --config job.yaml $(ARGS)

test: venv lint  ## lint, format check, then the test suite
	$(PY) -m pytest -q $(ARGS)

test-fast: venv lint  ## lint, then the tests that start no Ray (under 2 minutes)
	$(PY) -m pytest -q -m "not ray" $(ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf runs .pytest_cache .ruff_cache
