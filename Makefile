# Set-up is automatic: the first target that needs Python creates .venv and installs requirements.txt into it.
#   make vae                 train the recommended VAE (ARGS="--epochs 3" passes options, DATA_DIR=... the data root)
#   make test                the quick tests (CPU, about 3 minutes on 2 cores); make test-all adds the slow ones
#   make gpu-check           on a new GPU or cluster, first: the device, bit-exact resume, speed (tools/gpu_check.py)
#   make dcgan, make vae-betas, make gan-sweep, make analyze-vae RUN=..., make analyze-gan RUN=...   (see README.md)
#   make report, make submission (VAE_RUN=... GAN_RUN=... name the runs), make tensorboard, make bench, make gan-quality
#   make torch TORCH_INDEX=cu126|cpu   another PyTorch build in .venv: an older driver or GPU, or no GPU
PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
DATA_DIR ?= data
ARGS     ?=
# The exact versions the tests passed with; CONSTRAINTS= (empty) installs the newest allowed instead.
CONSTRAINTS ?= constraints.txt
PIP_INSTALL := $(PY) -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
TB_PORT  ?= 6006
# The betas of `make vae-betas`: one per line in slurm/betas.txt (# comments), the file the SLURM array reads too.
BETAS    ?= $(strip $(shell sed 's/\#.*//' slurm/betas.txt))

.PHONY: help vae vae-betas analyze-vae dcgan gan-sweep analyze-gan report submission tensorboard bench gan-quality gpu-check test \
	test-all test-slurm clean-venv torch

help:
	@sed -n '2,7p' Makefile

# Two stamp files: .installed for the scripts (requirements.txt), .installed-test adds the test suite's extras
# (requirements-test.txt). Each is rewritten when its files change (constraints.txt for both), so edits reinstall.
# A torch already in .venv that satisfies constraints.txt (a CPU-only or cu126 build, docs/operations.md) is kept.
$(VENV)/.installed: requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PIP_INSTALL) -r requirements.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt requirements.txt constraints.txt
	$(PIP_INSTALL) -r requirements-test.txt
	touch $@

# Another PyTorch build in .venv (docs/operations.md, "An older driver or GPU"), from PyTorch's index: cu126 for an
# NVIDIA driver older than 580 or a GPU older than Turing (V100, P100), cpu without a GPU, cu130 for pip's default
# back. The builds are named with their label (torch==2.14.1+cu126): a plain `pip install torch` keeps the torch in
# .venv, as 2.14.1+cu130 satisfies ==2.14.1, but no other build satisfies this one, so pip replaces torch and
# torchvision (the same release as constraints.txt's) and installs what the new build needs; the other build's
# NVIDIA libraries stay, unused (for the small CPU-only .venv, start from `make clean-venv`). Later `make` runs keep it.
TORCH_INDEX ?= cu126
TORCH_PIP_SOURCE ?= --index-url https://download.pytorch.org/whl/$(TORCH_INDEX) --extra-index-url https://pypi.org/simple
TORCH_BUILD = $(foreach p,torch torchvision,$(p)==$(shell sed -n 's/^$(p)==//p' constraints.txt)+$(TORCH_INDEX))

torch:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) $(TORCH_BUILD) $(TORCH_PIP_SOURCE)
	$(PY) -c "import torch, torchvision; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
	  'torchvision', torchvision.__version__)"

vae: $(VENV)/.installed
	$(PY) vae_train.py --data-dir $(DATA_DIR) $(ARGS)

# One run per beta, each in its own folder, all in sweep vae-betas (they never move runs/latest-vae); make report
# compares them, and so does `make analyze-vae RUN="runs/*-vae-beta*"`.
vae-betas: $(VENV)/.installed
	@test -n "$(BETAS)" || { echo "error: no betas in slurm/betas.txt (one per line)"; exit 2; }
	for beta in $(BETAS); do \
	  $(PY) vae_train.py --data-dir $(DATA_DIR) --beta $$beta --name vae-beta$$beta --sweep vae-betas $(ARGS) \
	    || exit $$?; \
	done

# RUN is one folder, spaces and all (RUN="runs/my run"), or a glob such as RUN="runs/*-vae-beta*" (expanded by the
# shell when it holds a * or ?).
RUN_PATHS = $(if $(findstring *,$(RUN))$(findstring ?,$(RUN)),$(RUN),"$(RUN)")
analyze-vae: RUN ?= runs/latest-vae
analyze-vae: $(VENV)/.installed
	$(PY) analyze_vae.py $(RUN_PATHS) $(ARGS)

dcgan: $(VENV)/.installed
	$(PY) dcgan_train.py --data-dir $(DATA_DIR) $(ARGS)

# The variants of slurm/dcgan_sweep.txt (dcgan_train.py options, one line each), one after another on this machine,
# all in sweep dcgan-sweep; `sbatch slurm/dcgan_sweep.sh` runs the same table as a SLURM array.
gan-sweep: $(VENV)/.installed
	sed 's/#.*//' slurm/dcgan_sweep.txt | grep -v '^[[:space:]]*$$' | while read -r options; do \
	  $(PY) dcgan_train.py --data-dir $(DATA_DIR) $$options --sweep dcgan-sweep $(ARGS) < /dev/null || exit $$?; \
	done

analyze-gan: RUN ?= runs/latest-dcgan
analyze-gan: $(VENV)/.installed
	$(PY) analyze_gan.py $(RUN_PATHS) $(ARGS)

# The report (report/REPORT.md and .html): the VAE and DCGAN runs that count (the newest finished runs that are not
# sweep members, or VAE_RUN=... GAN_RUN=...), the vae-betas sweep and the dcgan-sweep sweep.
report: $(VENV)/.installed
	$(PY) report.py $(if $(VAE_RUN),--vae-run "$(VAE_RUN)") $(if $(GAN_RUN),--gan-run "$(GAN_RUN)") $(ARGS)

# Checks the three model files of the runs that count (as make report picks them, or VAE_RUN=... GAN_RUN=...) as a
# grader would, then packs CW2.zip (models + report figures); nothing on failure. The VAE is checked on the test
# images of its own run's data folder unless DATA_DIR=... is given.
submission: $(VENV)/.installed
	$(PY) check_submission.py $(if $(VAE_RUN),--vae-run "$(VAE_RUN)") $(if $(GAN_RUN),--gan-run "$(GAN_RUN)") \
	  $(if $(filter-out file,$(origin DATA_DIR)),--data-dir "$(DATA_DIR)") --figures report/figures --zip CW2.zip $(ARGS)

# The live view: TensorBoard on every run under $(RUNS) (each writes RUN_DIR/tb/ as it trains), on this machine's
# http://localhost:$(TB_PORT). From another machine: ssh -L 6006:localhost:6006 HOST, then open that address
# (docs/operations.md). Ctrl-C stops it. Each run once, named by its folder: --logdir would follow the runs/latest*
# links and list a run up to three times, so the run folders are named one by one (--logdir_spec NAME:PATH,...),
# and a run started later appears after a restart of make tensorboard.
RUNS        ?= runs
TENSORBOARD ?= $(VENV)/bin/tensorboard
tensorboard: $(VENV)/.installed
	@spec=; for tb in "$(RUNS)"/*/tb; do run="$${tb%/tb}"; \
	  [ -d "$$tb" ] && [ ! -L "$$run" ] && spec="$$spec$${spec:+,}$${run##*/}:$$run"; done; \
	if [ -z "$$spec" ]; then echo "no run with TensorBoard events in $(RUNS)/ yet: start one, then make tensorboard"; \
	  exit 2; fi; \
	echo "TensorBoard on each run in $(RUNS)/ once (a run started later: restart make tensorboard)"; \
	$(TENSORBOARD) --logdir_spec "$$spec" --port $(TB_PORT)

# Speed and memory on this machine (tools/bench.py): a table and bench.json. Not part of `make test`.
bench: $(VENV)/.installed
	$(PY) tools/bench.py $(ARGS)

# The recommended DCGAN defaults against the plain DCGAN by classifier FID on MNIST and Fashion-MNIST (tools/gan_quality.py;
# docs/gan-quality.md): a table, runs/gan-quality/. Hours on a CPU; ARGS="--budgets small --seeds 0" is quicker.
gan-quality: $(VENV)/.installed
	$(PY) tools/gan_quality.py --data-dir $(DATA_DIR) $(ARGS)

# The doctor for a new GPU or cluster (tools/gpu_check.py): the device, driver and CUDA build; tiny VAE and DCGAN
# runs stopped by SIGTERM and resumed, equal to uninterrupted ones; on a GPU also the same with --amp fp16 --compile
# --channels-last, under torchrun, throughput and FID timing. Under a minute on a CPU (the CPU checks only), about
# 5 minutes on a T4; exit 1 on a FAIL. ARGS="--device cpu --full --images 64" rehearses every check on a CPU (CI).
gpu-check: $(VENV)/.installed
	$(PY) tools/gpu_check.py $(ARGS)

# The quick tests; `make test-all` also runs those marked slow (bench, --compile, torchrun, the SIGKILL soak).
# The test files run in parallel (pytest-xdist): one worker per core, at most 4 (each holds torch, ~1 GB), each
# file on one worker so that its module fixtures are made once. TEST_WORKERS=0 runs them all in this process.
TEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest tests -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile

test: $(VENV)/.installed-test
	$(PYTEST) -m "not slow" $(ARGS)

test-all: $(VENV)/.installed-test
	$(PYTEST) $(ARGS)

# The sbatch scripts under a real one-node SLURM cluster that the test starts and stops (tests/test_slurm_real.py,
# a few minutes); as root it installs Debian's slurm-wlm and munge when missing, and skips, saying why, when it can't.
test-slurm: $(VENV)/.installed-test
	GENMODELS_REAL_SLURM=1 $(PY) -m pytest tests/test_slurm_real.py -q -rs $(ARGS)

clean-venv:
	rm -rf $(VENV)
