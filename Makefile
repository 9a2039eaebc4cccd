# One command per study: every variant of a dataset, for each seed, then the figures and table.
#   make mnist SEEDS="0 1 2 3 4"     make fashionmnist     make cifar10     make plot
# Extra train.py flags go in ARGS, e.g. make mnist ARGS="--data_dir=data --device=cpu"
SEEDS ?= 0 1 2 3 4
ARGS ?=
PYTHON ?= python
VARIANTS = vit balanced diff

.PHONY: mnist fashionmnist cifar10 plot test

mnist fashionmnist cifar10:
	@for seed in $(SEEDS); do for v in $(VARIANTS); do \
		$(PYTHON) train.py config/$@_$$v.py --seed=$$seed $(ARGS) || exit 1; \
	done; done
	$(PYTHON) plot.py results/

plot:
	$(PYTHON) plot.py results/

test:
	$(PYTHON) -m pytest tests
