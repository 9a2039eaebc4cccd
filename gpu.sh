#!/usr/bin/env bash
# The GPU session in one command, in this order: the CUDA tests; bench.py for the MNIST and CIFAR-10 configs (eager
# and compiled, fused and explicit), and an epoch of the resident data pipeline against a DataLoader; one 10-epoch
# config/mnist_vit.py run timed end to end, compilation included; then CIFAR-10 with the GPU configs, the three
# variants and diff in bfloat16 at once on the one card, for the time left (epochs sized from the bench numbers).
# Everything lands in a new folder, results/gpu_<card>_<date>_<time>/ (never one of an earlier session), with
# log.txt; when $OUT is set (the device tool) the folder is also packed into $OUT/gpu_<card>.tar.gz, checkpoints
# left out.
#   bash gpu.sh              on the GPU machine; unpacks gpu_data/ (make gpu_data, README "GPU") into data/ first
#   DRY_RUN=1 bash gpu.sh    on a CPU with tiny models and a few steps, into out/: the test suite runs this
# Settings (environment): BUDGET_S (default 540: the whole command), DATA_DIR (data), RESULTS_DIR (results, or out
# for a dry run), SEED (0).
set -uo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-540}
DATA_DIR=${DATA_DIR:-data}
SEED=${SEED:-0}

if [ -n "${DRY_RUN:-}" ]; then
  card=dry_run
  RESULTS_DIR=${RESULTS_DIR:-out}
  model_args="--device=cpu --compile=False --n_layer=1 --n_embd=32 --mlp_dim=64"
  bench_args="--warmup_steps=1 --timed_steps=2"
  compile_settings=False
  mnist_args="--epochs=1"
  workers=1
else
  card=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || exit 1
  model_args=""
  bench_args="--warmup_steps=5 --timed_steps=20"
  compile_settings="False True"
  mnist_args=""
  workers=8
fi
out=${RESULTS_DIR:-results}/gpu_${card}_$(date +%Y-%m-%d_%H%M%S)
mkdir -p "$out"
log=$out/log.txt
say() { echo "[gpu.sh +${SECONDS}s] $*" | tee -a "$log"; }
left() { echo $((BUDGET_S - SECONDS)); }

if [ -f gpu_data/SHA256SUMS ] && [ ! -f "$DATA_DIR/cifar-10-batches-py/test_batch" ]; then
  say "unpacking gpu_data/ into $DATA_DIR/"
  (cd gpu_data && sha256sum --quiet -c SHA256SUMS) || { say "gpu_data/ is incomplete: carry every part first"; exit 1; }
  mkdir -p "$DATA_DIR" && cat gpu_data/part* | tar xzf - -C "$DATA_DIR" || exit 1
fi

say "1/4 CUDA tests ($card, torch $($PY -c 'import torch; print(torch.__version__)'))"
timeout 120 $PY -m pytest tests/test_cuda.py -v -rs 2>&1 | tee -a "$log"

say "2/4 bench"
# one process per config and compile setting, each under a timeout, so that a slow compile loses only its own rows
for config in mnist_vit cifar10_vit cifar10_small_vit; do
  for compiles in $compile_settings; do
    [ "$config" = cifar10_small_vit ] && [ "$compiles" = True ] && continue  # the CPU model: eager is enough
    timeout 100 $PY bench.py config/$config.py --data_dir="$DATA_DIR" --compiles=$compiles $model_args $bench_args 2>&1 \
      | tee -a "$out/bench_$config.txt" | grep -v '^{' | tee -a "$log"
  done
done
# one epoch of CIFAR-10 through data.py's resident pipeline, then through a torchvision DataLoader, same eager model
timeout 120 $PY bench.py config/cifar10_vit.py --data_dir="$DATA_DIR" --pipeline=True --attentions=classic --impls=fused \
  --compiles=False --compile=False --num_workers=$workers $model_args $bench_args 2>&1 \
  | tee -a "$out/bench_pipeline.txt" | grep -v '^{' | tee -a "$log"

say "3/4 config/mnist_vit.py, 10 epochs, timed end to end"
start=$(date +%s.%N)
timeout 120 $PY train.py config/mnist_vit.py --data_dir="$DATA_DIR" --seed="$SEED" --out_dir="$out/mnist_vit/seed$SEED" \
  --overwrite=True $model_args $mnist_args 2>&1 | tee -a "$log" | grep -E 'done|test loss'
echo "{\"run\": \"mnist_vit\", \"wall_s\": $($PY -c "print(round($(date +%s.%N) - $start, 1))")}" | tee "$out/mnist_wall.json" | tee -a "$log"

# epochs for the time left. Four runs share the card: the three variants (float32, as configured), and diff again in
# bfloat16 (its own study folder for plot.py), which cost diff 15 points on the H200 (results/NOTES.md). The card is
# not saturated by one run: three at once ran at 1.8x, six at once at 2.2x the bench's eager fused diff rate in all
# (H200), so each of the four gets half that rate; a minute is kept for compiling, evaluating and packing
rate=$($PY -c "import json, sys; rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith('{')]
print(min(r['img_per_s'] for r in rows if r['attention'] == 'diff' and r['impl'] == 'fused'))" "$out/bench_cifar10_vit.txt")
epochs=$($PY -c "print(max(1, int(($(left) - 60) * $rate / 2 / 45000)))")
[ -n "${DRY_RUN:-}" ] && epochs=1
say "4/4 CIFAR-10, vit / balanced / diff / diff in bfloat16 at once, $epochs epochs each (diff bench rate $rate img/s, $(left) s left)"
limit=$(($(left) - 20)); [ "$limit" -lt 30 ] && limit=30
for run in vit balanced diff diff:bfloat16; do
  variant=${run%:*} dtype_args="" dir=$out
  [ "$run" = diff:bfloat16 ] && dtype_args="--dtype=bfloat16" dir=$out/bfloat16
  mkdir -p "$dir"
  timeout $limit $PY train.py config/cifar10_$variant.py --data_dir="$DATA_DIR" --seed="$SEED" --epochs="$epochs" \
    --out_dir="$dir/cifar10_$variant/seed$SEED" --overwrite=True --log_interval=1000 $dtype_args $model_args \
    > "$dir/cifar10_$variant.log" 2>&1 &
done
wait
grep -H -E 'test loss|error' "$out"/cifar10_*.log "$out"/bfloat16/cifar10_*.log | tee -a "$log"

find "$out" -name ckpt.pt -delete
say "done: $out"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu_$card.tar.gz" -C "$(dirname "$out")" "$(basename "$out")" && cp "$log" "$OUT/log.txt"
fi
