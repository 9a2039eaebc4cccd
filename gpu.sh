#!/usr/bin/env bash
# A GPU session in one command. First, once per machine (a second command on the same machine skips them): the CUDA
# tests; bench.py for config/cifar10_vit.py in bfloat16 (every attention, fused, eager and compiled) with a profile of
# the training step; one 10-epoch config/mnist_vit.py run timed end to end. Then, for the time left, the GPU queue
# (queue/gpu.txt, in its order): WORKERS runs at once on the card through queue.sh, into results/gpu_<card>_runs/.
# A finished run is skipped, a run left unfinished by an earlier command on this machine resumes from its checkpoint,
# and a run still going at the deadline saves one for the next command. Each command logs to a new folder,
# results/gpu_<card>_<date>_<time>/ (log.txt, bench and profile); with $OUT set (the device tool) that folder and
# every finished queue run are packed into $OUT/gpu_<card>.tar.gz, checkpoints left out.
#   bash gpu.sh              on the GPU machine; unpacks gpu_data/ (make gpu_data) into data/ first when it is there
#   DRY_RUN=1 bash gpu.sh    on a CPU, tiny models, a few steps, one epoch a run, into out/: the test suite runs this
# Settings (environment): BUDGET_S (540: the whole command), WORKERS (4), QUEUE (queue/gpu.txt), DATA_DIR (data),
# RESULTS_DIR (results, or out for a dry run), SEED (0, the mnist run).
set -uo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-540}
WORKERS=${WORKERS:-4}
QUEUE=${QUEUE:-queue/gpu.txt}
DATA_DIR=${DATA_DIR:-data}
SEED=${SEED:-0}

if [ -n "${DRY_RUN:-}" ]; then
  card=dry_run
  RESULTS_DIR=${RESULTS_DIR:-out}
  state=$RESULTS_DIR
  model_args="--device=cpu --compile=False --n_layer=1 --n_embd=32 --mlp_dim=64"
  bench_args="--warmup_steps=1 --timed_steps=2 --compiles=False --batch_size=64"
  mnist_args="--epochs=1"
  queue_args="$model_args --epochs=1 --log_interval=1000"
else
  card=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || exit 1
  RESULTS_DIR=${RESULTS_DIR:-results}
  state=out  # git-ignored, kept while the machine stays warm
  model_args=""
  bench_args="--warmup_steps=5 --timed_steps=20"
  mnist_args=""
  queue_args="--log_interval=1000"
fi
[ -f "$QUEUE" ] || { echo "error: queue file $QUEUE not found" >&2; exit 1; }
out=$RESULTS_DIR/gpu_${card}_$(date +%Y-%m-%d_%H%M%S)
runs=$RESULTS_DIR/gpu_${card}_runs
mkdir -p "$out" "$state"
log=$out/log.txt
say() { echo "[gpu.sh +${SECONDS}s] $*" | tee -a "$log"; }

if [ -f gpu_data/SHA256SUMS ] && [ ! -f "$DATA_DIR/cifar-10-batches-py/test_batch" ]; then
  say "unpacking gpu_data/ into $DATA_DIR/"
  (cd gpu_data && sha256sum --quiet -c SHA256SUMS) || { say "gpu_data/ is incomplete: carry every part first"; exit 1; }
  mkdir -p "$DATA_DIR" && cat gpu_data/part* | tar xzf - -C "$DATA_DIR" || exit 1
fi

if [ -f "$state/gpu_checks_done_$card" ]; then
  say "1-3/4 checks: done by an earlier command on this machine ($state/gpu_checks_done_$card)"
else
  say "1/4 CUDA tests ($card, torch $($PY -c 'import torch; print(torch.__version__)'))"
  timeout 120 $PY -m pytest tests/test_cuda.py -v -rs 2>&1 | tee -a "$log"

  say "2/4 bench and profile, config/cifar10_vit.py in bfloat16"
  timeout 180 $PY bench.py config/cifar10_vit.py --data_dir="$DATA_DIR" --dtype=bfloat16 --impls=fused --profile=True \
    $model_args $bench_args 2>&1 | tee "$out/bench_cifar10_vit.txt" | grep -v '^{' | tee -a "$log"

  say "3/4 config/mnist_vit.py, 10 epochs, timed end to end"
  start=$(date +%s.%N)
  timeout 120 $PY train.py config/mnist_vit.py --data_dir="$DATA_DIR" --seed="$SEED" --out_dir="$out/mnist_vit/seed$SEED" \
    --overwrite=True $model_args $mnist_args 2>&1 | tee -a "$log" | grep -E 'done|test loss'
  echo "{\"run\": \"mnist_vit\", \"wall_s\": $($PY -c "print(round($(date +%s.%N) - $start, 1))")}" | tee "$out/mnist_wall.json" | tee -a "$log"
  touch "$state/gpu_checks_done_$card"
fi

left=$((BUDGET_S - SECONDS - 30))  # 30 s to pack
[ "$left" -lt 1 ] && left=1  # queue.sh then starts nothing (BUDGET_S=0 would mean no limit)
say "4/4 the queue $QUEUE, $WORKERS at once, for ${left} s, into $runs/"
for w in $(seq "$WORKERS"); do
  BUDGET_S=$left PYTHON=$PY PREFIX="$runs/" ARGS="--data_dir=$DATA_DIR --analyses=all $queue_args" \
    bash queue.sh "$QUEUE" > "$out/queue_worker$w.log" 2>&1 &
  sleep 1  # each worker takes the next run that nobody holds
done
wait
cat "$out"/queue_worker*.log >> "$log"
finished=$(grep -l '"test": {' -r --include=metrics.json "$runs" 2>/dev/null | xargs -r -n1 dirname | sort)
say "finished runs in $runs/: $(echo "$finished" | grep -c .)"
for dir in $finished; do
  echo "  ${dir#"$runs"/}: $(grep -h '^test loss' "$dir/train.log" | tail -1)" | tee -a "$log"
done

find "$out" -name ckpt.pt -delete
say "done: $out"
if [ -n "${OUT:-}" ]; then
  # relative to RESULTS_DIR, so that the tarball unpacks into results/ as it is laid out here
  tar czf "$OUT/gpu_$card.tar.gz" --exclude=ckpt.pt --exclude='*.lock' -C "$RESULTS_DIR" "${out#"$RESULTS_DIR"/}" \
    $(for dir in $finished; do echo "${dir#"$RESULTS_DIR"/}"; done) && cp "$log" "$OUT/log.txt"
fi
