# The studies: every variant of a dataset for each seed, written to results/<config>/seed<seed>/, then plot.py.
# A run never replaces one that is already there (train.py refuses): move it away, or add --overwrite=True.
# Extra train.py flags go in ARGS, e.g. make mnist SEEDS="0 1" ARGS="--data_dir=data --device=cpu"
SEEDS ?= 0 1 2 3 4
ARGS ?=
PYTHON ?= python
VARIANTS = vit balanced diff

.PHONY: help mnist fashionmnist cifar10 cifar10_small plot test gpu_data gpu_data_part_size gpu_light gpu_restore

help:
	@echo "make mnist | fashionmnist | cifar10 | cifar10_small   train a study into results/ (SEEDS=\"$(SEEDS)\", ARGS=...)"
	@echo "make plot                                           figures and table from results/"
	@echo "make test                                           the test suite"
	@echo "make gpu_data                                       pack data/ into parts for the GPU machine (README, GPU)"
	@echo "make gpu_data_part_size                             their size in bytes: 64 MiB a call less the working tree"
	@echo "make gpu_light | gpu_restore                        leave the committed weights behind on GPU calls, and undo it"
	@echo "Single runs: python train.py config/<file>.py (writes out/, git-ignored); python train.py --help"

mnist fashionmnist cifar10 cifar10_small:
	@for seed in $(SEEDS); do for v in $(VARIANTS); do \
		$(PYTHON) train.py config/$@_$$v.py --seed=$$seed --out_dir=results/$@_$$v/seed$$seed --analyses=all $(ARGS) || exit 1; \
	done; done
	$(PYTHON) plot.py results/

plot:
	$(PYTHON) plot.py results/

test:
	$(PYTHON) -m pytest tests

# MNIST and CIFAR-10 from data/ (not FashionMNIST: no GPU run uses it) in parts for a machine reached with 64 MiB
# per command (gpu.sh; results/NOTES.md, "The GPU machine"). Each command also carries the working tree (tracked
# files and untracked ones that git does not ignore) and SHA256SUMS, so a part is 64 MiB less the tree's size now and
# a margin; make refuses when that leaves less than GPU_MIN_PART_MIB. `make gpu_data_part_size` prints the part size.
GPU_CALL_MIB ?= 64
GPU_MARGIN_MIB ?= 4
GPU_MIN_PART_MIB ?= 8
GPU_TREE_BYTES = $(shell git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
GPU_PART_BYTES = $(shell echo $$(( ($(GPU_CALL_MIB) - $(GPU_MARGIN_MIB)) * 1048576 - $(GPU_TREE_BYTES) )))

gpu_data_part_size:
	@if [ $(GPU_PART_BYTES) -lt $$(( $(GPU_MIN_PART_MIB) * 1048576 )) ]; then \
		echo "error: a $(GPU_CALL_MIB) MiB GPU call less the working tree ($(GPU_TREE_BYTES) bytes) and a $(GPU_MARGIN_MIB) MiB margin leaves $(GPU_PART_BYTES) bytes for a data part, under $(GPU_MIN_PART_MIB) MiB: make gpu_light first, or make the tree smaller" >&2; \
		exit 1; \
	fi
	@echo $(GPU_PART_BYTES)

gpu_data: gpu_data_part_size
	rm -rf gpu_data && mkdir gpu_data
	tar czf - -C data MNIST/raw cifar-10-batches-py | split -b $(GPU_PART_BYTES) -d - gpu_data/part
	cd gpu_data && sha256sum part* > SHA256SUMS && ls -l
	@echo "$$(ls gpu_data/part* | wc -l) parts: carry gpu_data/SHA256SUMS and one part a call (README, GPU)"

# The committed weights and attention samples (70 of the tree's 76 MB on 2026-12-03, 1.3-1.5 MB more with each run)
# would soon fill a GPU call's 64 MiB on their own, and no GPU command reads them. gpu_light takes them out of git's
# index (not off the disk) and ignores them in results/.gitignore (which ignores itself too, and outranks the root
# .gitignore's !/results/**/model.pt), so that a call leaves them behind; gpu_restore removes that file and puts the
# index back as HEAD has it. Restore before unpacking what the GPU sent back or committing anything: a commit in
# between would delete the weights from the repository.
GPU_HEAVY = model.pt attention.npz

gpu_light:
	@git diff --cached --quiet -- results || { echo "error: results/ has staged changes: commit or unstage them first" >&2; exit 1; }
	@[ ! -e results/.gitignore ] || { echo "error: results/.gitignore exists: make gpu_light ran already (make gpu_restore undoes it)" >&2; exit 1; }
	git rm -r -q --cached --ignore-unmatch -- $(foreach f,$(GPU_HEAVY),'results/*/$(f)')
	printf '%s\n' .gitignore $(GPU_HEAVY) > results/.gitignore
	@echo "the working tree a GPU call carries: $(GPU_TREE_BYTES) bytes before; now $$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1). Run make gpu_restore before committing."

gpu_restore:
	rm -f results/.gitignore
	git reset -q -- results
	@git diff --cached --quiet -- results && echo "results/ is in git's index again as HEAD has it"
