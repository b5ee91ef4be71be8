# clipline — every target here is what CI runs (.ci/run calls `make test`).
SHELL := bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PY_SOURCES := clipline_core clipline workers gpu_service operator/clipline_operator bench/clipline_bench tests

# The demo uses the real sample media next to the repository when present,
# otherwise fetches it (Debian's opencv-doc package) into .samples/.
MEDIA ?= $(firstword $(wildcard ../shared/media) .samples)
SAMPLE_VIDEO ?= $(MEDIA)/Megamind.avi
SAMPLE_IMAGE ?= $(MEDIA)/fruits.jpg

.PHONY: install demo test lint format typecheck pytest samples bench bench-quick dashboards clean

install: $(STAMP)

# Exact versions from constraints.txt (scripts/update-constraints.py writes it); torch,
# which it leaves out, at TORCH_VERSION from the default index (the Dockerfile names the
# CUDA one).
TORCH_VERSION ?= 2.13.0

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: install
	@if [ ! -f "$(SAMPLE_VIDEO)" ]; then scripts/fetch-samples.sh .samples; fi
	$(BIN)/clipline highlight "$(SAMPLE_VIDEO)" --image "$(SAMPLE_IMAGE)" \
		--title "Fresh fruit" --description "A bowl of fruit" --out highlights

test: install lint typecheck pytest

lint: install
	$(BIN)/ruff check $(PY_SOURCES)
	$(BIN)/ruff format --check $(PY_SOURCES)
	$(BIN)/python -m clipline.dashboards --check
	$(BIN)/hadolint Dockerfile

format: install
	$(BIN)/ruff format $(PY_SOURCES)
	$(BIN)/ruff check --fix $(PY_SOURCES)

typecheck: install
	$(BIN)/mypy

# The quality cases use OpenCV's sample photos (Debian's opencv-doc package): the
# installed copy, else one fetched into .samples/opencv-data (tests skip, saying so,
# when neither can be had).
OPENCV_DATA ?= $(firstword $(wildcard /usr/share/doc/opencv-doc/examples/data/box.png) .samples/opencv-data/box.png)

# The real sample media (MEDIA): the folder next to the repository, else fetched into
# .samples/ (tests that need it skip, saying so, when it cannot be had).
samples:
	@test -f "$(OPENCV_DATA)" || scripts/fetch-samples.sh .samples --all-data \
		|| echo "OpenCV sample data unavailable: the quality-case tests will skip"
	@test -f "$(MEDIA)/Megamind.avi" || scripts/fetch-samples.sh .samples \
		|| echo "sample media unavailable: the tests on real footage will skip"

pytest: install samples
	CLIPLINE_OPENCV_DATA="$(abspath $(dir $(OPENCV_DATA)))" \
		CLIPLINE_MEDIA_DIR="$(abspath $(MEDIA))" $(BIN)/python -m pytest

# Full benchmarks: tables on stdout, JSON under bench/results/.
bench: install
	bench/run-all.sh

bench-quick: install
	bench/run-all.sh --quick

dashboards: install
	$(BIN)/python -m clipline.dashboards --write

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache highlights
