# The studies: every variant of a dataset for each seed, written to results/<config>/seed<seed>/, then plot.py.
# A run never replaces one that is already there (train.py refuses): move it away, or add --overwrite=True.
# Extra train.py flags go in ARGS, e.g. make mnist SEEDS="0 1" ARGS="--data_dir=data --device=cpu"
SEEDS ?= 0 1 2 3 4
ARGS ?=
PYTHON ?= python
VARIANTS = vit balanced diff

.PHONY: help mnist fashionmnist cifar10 cifar10_small plot test gpu_data

help:
	@echo "make mnist | fashionmnist | cifar10 | cifar10_small   train a study into results/ (SEEDS=\"$(SEEDS)\", ARGS=...)"
	@echo "make plot                                           figures and table from results/"
	@echo "make test                                           the test suite"
	@echo "make gpu_data                                       pack data/ into parts for the GPU machine (README, GPU)"
	@echo "Single runs: python train.py config/<file>.py (writes out/, git-ignored); python train.py --help"

mnist fashionmnist cifar10 cifar10_small:
	@for seed in $(SEEDS); do for v in $(VARIANTS); do \
		$(PYTHON) train.py config/$@_$$v.py --seed=$$seed --out_dir=results/$@_$$v/seed$$seed $(ARGS) || exit 1; \
	done; done
	$(PYTHON) plot.py results/

plot:
	$(PYTHON) plot.py results/

test:
	$(PYTHON) -m pytest tests

# MNIST and CIFAR-10 from data/ (not FashionMNIST: no GPU run uses it) in parts of at most 48 MiB, for a machine
# reached with 64 MiB per command (gpu.sh; results/NOTES.md, "The GPU machine"):
# each call also carries the working tree (6.8 MB in November 2026)
gpu_data:
	rm -rf gpu_data && mkdir gpu_data
	tar czf - -C data MNIST/raw cifar-10-batches-py | split -b 48m -d - gpu_data/part
	cd gpu_data && sha256sum part* > SHA256SUMS && ls -l
