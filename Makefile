# casam: one command installs and runs the demo, one installs and runs the tests.
#
#   make demo                      # install, then train → export → infer on the tiny SAM
#   make demo SAM=tiny_mobile_sam  # the same on a tiny seeded MobileSAM-architecture model
#   make test                      # install, then the whole test suite (2 pytest-xdist workers)
#   make bench-report              # render BENCHMARKS.md's tables from bench/results/*.json
#
# Variables:
#   TORCH=torch==2.13.0            torch requirement (a CPU build on CPU machines; plain
#                                  `torch` with none installed pulls several GB of CUDA)
#   ORT=onnxruntime-gpu            or `onnxruntime` (never both: they share one folder)
#   PYTHON=python3  VENV=.venv
#   SAM=tiny                       demo's SAM variant (models/sam_loader.py SAM_SPECS), e.g.
#                                  tiny_mobile_sam, tiny_efficientvit, or mobile_sam with
#                                  DEMO_ARGS="--checkpoint mobile_sam.pt"

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
ORT ?= onnxruntime-gpu
SAM ?= tiny
DEMO_ARGS ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.casam-installed

.PHONY: install demo test bench bench-report clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Torch first, pinned, so nothing later pulls another build; then casam with its extras.
# The ORT flavour not chosen is removed first, because both wheels write one folder.
install: $(PY)
	$(PIP) install -q "$(TORCH)"
	@other=$$([ "$(ORT)" = "onnxruntime" ] && echo onnxruntime-gpu || echo onnxruntime); \
	  if $(PIP) show -q $$other >/dev/null 2>&1; then $(PIP) uninstall -q -y $$other; fi
	CASAM_ORT=$(ORT) $(PIP) install -q -e ".[train,serve,medical,openvino,dev]"
	# EfficientViT-SAM's reference (a test reference only) declares torchvision, which its
	# model code never uses: installed without dependencies so no torchvision/CUDA comes along.
	$(PIP) install -q --no-deps "efficientsam==1.0.0"
	@touch $(STAMP)

demo: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash demo.sh --sam $(SAM) $(DEMO_ARGS)

# Two workers (the CI machine has 2 cores); a test file stays on one worker, so the
# fixtures a file shares (trained bundles, exports) are built once per file, not per test.
# dciodvfy (Debian's dicom3tools) validates every DICOM SEG the tests write: installed here
# when running as root on a Debian/Ubuntu machine, else named; CI=true fails without it.
# -rs lists every skip and its reason (under CI=true only GPU and TensorRT tests may skip).
test: install
	@command -v dciodvfy >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && apt-get install -y -qq dicom3tools; \
	  else \
	    echo "dciodvfy not found: install Debian's dicom3tools (sudo apt-get install dicom3tools);" \
	         "the SEG validations skip without it (and fail under CI=true)"; \
	  fi; }
	$(PY) -m pytest -q -rs -n 2 --dist loadfile tests

bench: install
	$(PY) bench/encoder_time.py

# BENCHMARKS.md's tables, rendered from the records in bench/results/ (byte for byte the same
# on every machine; tests/test_bench_report.py fails when the committed file differs).
bench-report:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bench/render.py

clean:
	rm -rf $(VENV) demo_out demo_work build *.egg-info
