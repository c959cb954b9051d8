# testbed: end-to-end test bed for VIRTIO Shared Memory Regions over vhost-user in QEMU.
#
#   make e2e      set up what is missing, run every scenario on both architectures
#   make test     set up, run the fast tests, then the end-to-end scenarios
#   make nightly  the scenarios as an avocado job (arch x accel matrix, HTML + xunit)
#   make bench    the benchmark (results/bench.json, table, chart)
#   make soak     long hot-plug and map/unmap cycles with fd/RSS accounting
#   make lint     ruff + mypy
#
# Point it at your own QEMU: make e2e TESTBED_QEMU_X86_64=~/qemu/build/qemu-system-x86_64

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Scenario workers: 2 on this 2-core class of machine; override with WORKERS=N.
WORKERS ?= 2
RESULTS ?= results
PYTEST_ARGS ?=
# The soak: both architectures; cycles after warm-up per test, empty = the per-arch default
# (scenarios/soak/conftest.py: hot-plug 100, map/unmap 500), a few minutes per arch. Memory
# is judged over >= 100 hot-plug / 300 map cycles; the nightly job runs
# SOAK_HOTPLUG_CYCLES=400.
SOAK_ARCH ?= x86_64,aarch64
SOAK_HOTPLUG_CYCLES ?=
SOAK_MAP_CYCLES ?=
# e.g. BENCH_ARGS='--quick --runs 3'
BENCH_ARGS ?=
# The fuzzer (not part of make test): one campaign per arch in FUZZ_ARCH, e.g.
# make fuzz FUZZ_ARGS='--time 20m --seed 7'; results in $(RESULTS)/fuzz/<run>/.
FUZZ_ARCH ?= x86_64 aarch64
FUZZ_ARGS ?= --time 10m --seed 1

export TESTBED_RESULTS := $(abspath $(RESULTS))
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test fast e2e nightly bench soak lint clean distclean help

help:
	@sed -n '3,12p' Makefile

setup:
	@PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh

fast: setup
	$(BIN)/pytest tests -n $(WORKERS) -q $(PYTEST_ARGS)

# Each run's artifacts describe that run only: the previous run's are removed first.
test: setup
	$(BIN)/pytest tests -n $(WORKERS) -q $(PYTEST_ARGS)
	rm -rf $(RESULTS)/artifacts
	$(BIN)/pytest scenarios -n $(WORKERS) --dist loadgroup $(PYTEST_ARGS)

e2e: setup
	rm -rf $(RESULTS)/artifacts
	$(BIN)/pytest scenarios -n $(WORKERS) --dist loadgroup $(PYTEST_ARGS)

nightly: setup
	$(BIN)/python scripts/nightly.py --results $(RESULTS)/nightly

bench: setup
	$(BIN)/testbed bench --output $(RESULTS) $(BENCH_ARGS)

soak: setup
	SOAK_HOTPLUG_CYCLES=$(SOAK_HOTPLUG_CYCLES) SOAK_MAP_CYCLES=$(SOAK_MAP_CYCLES) \
	  $(BIN)/pytest scenarios/soak -p no:randomly -v --arch $(SOAK_ARCH) $(PYTEST_ARGS)

.PHONY: fuzz
fuzz: setup
	for arch in $(FUZZ_ARCH); do $(BIN)/testbed fuzz --arch $$arch $(FUZZ_ARGS) || exit 1; done

lint: setup
	$(BIN)/ruff check testbed tests scenarios scripts
	$(BIN)/ruff format --check testbed tests scenarios scripts
	$(BIN)/mypy
	$(BIN)/mypy scenarios/soak/conftest.py

clean:
	rm -rf $(RESULTS) .pytest_cache .mypy_cache .ruff_cache

distclean: clean
	rm -rf $(VENV)
