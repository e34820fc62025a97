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
	CASAM_ORT=$(ORT) $(PIP) install -q -e ".[train,serve,medical,pacs,openvino,interactive,eval,dev]"
	# MONAI Label's own client drives casam-label's MONAI Label API in the tests; the client needs only
	# requests, but the package requires torch and monai, so it is installed without its dependencies.
	$(PIP) install -q --no-deps monailabel==0.8.5
	# EfficientViT-SAM's reference (a test reference only) declares torchvision, which its
	# model code never uses: installed without dependencies so no torchvision/CUDA comes along.
	$(PIP) install -q --no-deps "efficientsam==1.0.0"
	@touch $(STAMP)

demo: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash demo.sh --sam $(SAM) $(DEMO_ARGS)

# Two workers (the CI machine has 2 cores); a test file stays on one worker, so the
# fixtures a file shares (trained bundles, exports) are built once per file, not per test.
# dciodvfy (Debian's dicom3tools) validates every DICOM SEG the tests write, and the PACS tests
# start a real Orthanc with its DICOMweb plugin (Debian's orthanc, orthanc-dicomweb; on 127.0.0.1,
# free ports, never the system service's): installed here when running as root on a
# Debian/Ubuntu machine, else named (elsewhere: Orthanc's own packages or the orthancteam/orthanc
# image's binary at /usr/sbin/Orthanc with the plugin at /usr/share/orthanc/plugins/); the tests
# that need them skip without them, and CI=true fails instead. Debian's chromium likewise, for the
# viewer's Playwright tests (Playwright drives it, never a browser of its own).
# -rs lists every skip and its reason (under CI=true only GPU and TensorRT tests may skip).
test: install
	@need=""; \
	  command -v dciodvfy >/dev/null 2>&1 || need="dicom3tools"; \
	  [ -x /usr/sbin/Orthanc ] || need="$$need orthanc"; \
	  [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need="$$need orthanc-dicomweb"; \
	  command -v chromium >/dev/null 2>&1 || need="$$need chromium"; \
	  if [ -n "$$need" ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      apt-get update -qq && apt-get install -y -qq $$need; \
	    else \
	      echo "not installed: $$need (sudo apt-get install $$need);" \
	           "the tests that need them skip (and fail under CI=true)"; \
	    fi; \
	  fi
	$(PY) -m pytest -q -rs -n 2 --dist loadfile tests

bench: install
	$(PY) bench/encoder_time.py

# BENCHMARKS.md's tables, rendered from the records in bench/results/ (byte for byte the same
# on every machine; tests/test_bench_report.py fails when the committed file differs).
bench-report:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bench/render.py

clean:
	rm -rf $(VENV) demo_out demo_work build *.egg-info
