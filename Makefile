# Set-up is automatic: the first target that needs Python creates .venv and installs requirements.txt into it.
#   make vae                 train the recommended VAE (ARGS="--epochs 3" passes options, DATA_DIR=... the data root)
#   make test                the test suite (CPU, a few minutes)
#   make dcgan, make vae-betas, make analyze-vae RUN=..., make analyze-gan RUN=...   (see README.md)
#   make report, make submission, make bench
PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
DATA_DIR ?= data
ARGS     ?=
BETAS    ?= 0.5 1 2 4

.PHONY: help vae vae-betas analyze-vae dcgan analyze-gan report submission bench test clean-venv

help:
	@sed -n '2,5p' Makefile

# The stamp file is rewritten whenever requirements.txt changes, so edits to it reinstall.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

vae: $(VENV)/.installed
	$(PY) vae_train.py --data-dir $(DATA_DIR) $(ARGS)

# One run per beta, each in its own folder; analyze them together with `make analyze-vae RUN="runs/*beta*"`.
vae-betas: $(VENV)/.installed
	for beta in $(BETAS); do \
	  $(PY) vae_train.py --data-dir $(DATA_DIR) --beta $$beta --name vae-beta$$beta $(ARGS) || exit $$?; \
	done

analyze-vae: RUN ?= runs/latest-vae
analyze-vae: $(VENV)/.installed
	$(PY) analyze_vae.py $(RUN) $(ARGS)

dcgan: $(VENV)/.installed
	$(PY) dcgan_train.py --data-dir $(DATA_DIR) $(ARGS)

analyze-gan: RUN ?= runs/latest-dcgan
analyze-gan: $(VENV)/.installed
	$(PY) analyze_gan.py $(RUN) $(ARGS)

# The report (report/REPORT.md and .html) from runs/latest-vae, the beta sweep and runs/latest-dcgan.
report: $(VENV)/.installed
	$(PY) report.py $(ARGS)

# Checks the three model files as a grader would, then packs CW2.zip (models + report figures); nothing on failure.
submission: VAE_RUN ?= runs/latest-vae
submission: GAN_RUN ?= runs/latest-dcgan
submission: $(VENV)/.installed
	$(PY) check_submission.py $(VAE_RUN) --gen $(GAN_RUN)/DCGAN_model_G.pth --disc $(GAN_RUN)/DCGAN_model_D.pth \
	  --data-dir $(DATA_DIR) --figures report/figures --zip CW2.zip

# Speed and memory on this machine (bench.py): a table and bench.json. Not part of `make test`.
bench: $(VENV)/.installed
	$(PY) bench.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest tests -q $(ARGS)

clean-venv:
	rm -rf $(VENV)
