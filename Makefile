# The README's two commands are `make demo` and `make test`; both set everything up from scratch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_INSTALL := $(VENV)/.installed-demo
TEST_INSTALL := $(VENV)/.installed-test
DEMO := out/demo
TORCH := torch==2.13.0
export MOBILENET_FIXTURES ?= $(CURDIR)/.cache/fixtures

.PHONY: install fixtures demo test lint fuzz parity bench bench-eval clean

install: $(TEST_INSTALL)

# What the demo needs: torch first, at the version CI tests (pyproject.toml accepts a range, so an existing
# CPU or CUDA build is kept elsewhere); then the project (editable) with the [verify] extra, as the demo verifies.
$(DEMO_INSTALL): pyproject.toml
	"$(PYTHON)" -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[verify]'
	touch $@

# Everything else the tests, lint, fuzzing, parity matrix and benchmarks use: the [test] extras.
$(TEST_INSTALL): $(DEMO_INSTALL)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

fixtures: install
	$(BIN)/python -m fixtures build --all

demo: $(DEMO_INSTALL)
	$(BIN)/python -m fixtures build --name mobilenet_v2_1.0_224
	$(BIN)/convert-mobilenet --depth 1.0 --size 224 --force --verify \
		--checkpoint "$(MOBILENET_FIXTURES)/mobilenet_v2_1.0_224/mobilenet_v2_1.0_224.tgz" \
		--output $(DEMO)/mobilenet_v2_1.0_224
	@echo
	@echo "Converted model:  $(DEMO)/mobilenet_v2_1.0_224 (model card: README.md)"
	@echo "Parity report:    $(DEMO)/mobilenet_v2_1.0_224/parity/parity.md (also .json, .xml, .png)"
	@echo "The commands (convert-mobilenet, verify-mobilenet, predict-mobilenet) are in $(BIN):"
	@echo "  run 'source $(BIN)/activate' to put them on PATH, or call them as $(BIN)/convert-mobilenet"

test: install
	$(BIN)/python -m pytest -n 2 -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# Convert and verify every fixture zoo model against its original TF graph; reports in reports/.
# The tables in docs/ are filled from reports/ by tools.docs_tables, even when a check failed.
parity: install
	$(BIN)/python -m tools.parity_matrix --out reports --jobs 2; status=$$?; \
		$(BIN)/python -m tools.docs_tables reports; exit $$status

# Every speed target of the project in one run (inference, compile, ONNX, the integer model, conversion), with
# progress lines on stderr; reports/bench.{md,json}.
bench: install
	$(BIN)/python -m fixtures build --name mobilenet_v2_1.0_224
	$(BIN)/python benchmarks/bench.py
	$(BIN)/python -m tools.docs_tables reports

# eval-mobilenet's images/s against the model's plain inference on pre-decoded tensors; reports/eval_bench.{md,json}.
bench-eval: install
	$(BIN)/python -m fixtures build --name mobilenet_v2_1.0_224
	$(BIN)/python benchmarks/eval_bench.py
	$(BIN)/python -m tools.docs_tables reports

fuzz: install
	$(BIN)/python -m fixtures.fuzz_reader --cases 10000 --seed 1
	$(BIN)/python -m fixtures.fuzz_reader --format tflite --cases 10000 --seed 1

clean:
	rm -rf out reports .cache .pytest_cache
