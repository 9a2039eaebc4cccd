#!/usr/bin/env bash
# Works through a queue of training runs, a file of lines "<out_dir> <train.py arguments>", in order. A finished run
# (its metrics.json has a test result) is skipped, and so is a failed one (its metrics.json records "failures", e.g. a
# non-finite loss: never retried silently); a run with a checkpoint is resumed, a run that another worker is training
# is left to it. So several workers can share one queue (one on 2 cores: results/NOTES.md), and a
# queue stopped at any moment (Ctrl-C, SIGTERM, a machine that goes away) goes on where it was when started again.
# Each run's output goes to <out_dir>/train.log. A worker reads its queue as it goes: to change a queue, stop its
# workers (their runs save) and start them again. At the end a worker counts the queue's runs: finished, skipped (failed
# before), failed now (an error in this worker), left (stopped, not reached, or another worker's).
#   bash queue.sh queue/cpu.txt                                   one worker
#   bash queue.sh queue/cpu.txt & bash queue.sh queue/cpu.txt &   two
#   PLAN=1 bash queue.sh queue/cpu.txt                            what a worker would do now, without doing it
# Settings (environment): ARGS (appended to every run, e.g. --data_dir=data), BUDGET_S (start no run after this many
# seconds, and stop the running one then: it saves a checkpoint, and the next worker resumes it), PREFIX (put before
# every out_dir, e.g. results/gpu_NVIDIA_H200_runs/), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")"
queue=${1:?usage: bash queue.sh <queue file>, e.g. queue/cpu.txt}
[ -f "$queue" ] || { echo "error: queue file $queue not found" >&2; exit 1; }
PY=${PYTHON:-python3}
ARGS=${ARGS:-}
BUDGET_S=${BUDGET_S:-0}
PREFIX=${PREFIX:-}
say() { echo "[queue.sh $(date +%H:%M:%S)] $*" 2> /dev/null || true; }  # best effort: a closed stdout stops nothing
trap '' PIPE  # a closed stdout (`| tee` ended) fails say's echo instead of ending this worker with SIGPIPE
finished() { grep -qs '"test": {' "$1/metrics.json"; }  # its metrics.json has a test result
failed() { grep -qs '"failures"' "$1/metrics.json"; }  # it stopped on a non-finite loss

stopping=0
n_total=0 n_finished=0 n_skipped=0 n_failed=0  # the queue's runs, for the summary at the end
trap 'stopping=1; [ -n "${pid:-}" ] && kill -TERM "$pid" 2>/dev/null' INT TERM
while read -r out_dir args; do
  case "$out_dir" in ''|'#'*) continue ;; esac
  n_total=$((n_total + 1))
  [ "$stopping" = 1 ] && continue  # counted as left
  out_dir=$PREFIX$out_dir
  finished "$out_dir" && { n_finished=$((n_finished + 1)); continue; }
  if failed "$out_dir"; then
    say "$out_dir: skipped, it failed before (the \"failures\" in its metrics.json); resume it by hand to try again"
    n_skipped=$((n_skipped + 1))
    continue  # a divergence is a result: never retried silently
  fi
  if [ -f "$out_dir/run.lock" ] && kill -0 "$(cat "$out_dir/run.lock" 2>/dev/null)" 2>/dev/null; then
    continue  # another worker trains it
  fi
  if [ -z "${PLAN:-}" ] && command -v flock > /dev/null; then
    # train.py takes run.lock only seconds after it starts: a claim held by this worker and its train.py (fd 9, open
    # until the next run's) keeps a worker started a moment later from taking the same run
    mkdir -p "$out_dir"
    exec 9> "$out_dir/queue.lock"
    flock -n 9 || continue
    finished "$out_dir" && { n_finished=$((n_finished + 1)); continue; }  # while this worker looked
    failed "$out_dir" && { n_skipped=$((n_skipped + 1)); continue; }
  fi
  init=--init_from=scratch
  if [ -f "$out_dir/ckpt.pt" ]; then
    init=--init_from=resume
  elif [ -f "$out_dir/metrics.json" ]; then
    init="--init_from=scratch --overwrite=True"  # unfinished, and its checkpoint is gone (another machine)
  fi
  limit=0
  if [ "$BUDGET_S" -gt 0 ]; then
    limit=$((BUDGET_S - SECONDS))
    [ "$limit" -lt 30 ] && { say "budget spent: stopping before $out_dir"; stopping=1; continue; }
  fi
  say "$out_dir: $PY train.py $args --out_dir=$out_dir $init $ARGS"
  [ -n "${PLAN:-}" ] && continue
  mkdir -p "$out_dir"
  # a run stopped by the budget gets SIGTERM, saves, and exits 143; `timeout` would also kill a stuck one
  if [ "$limit" -gt 0 ]; then
    timeout -s TERM -k 60 "$limit" $PY train.py $args --out_dir="$out_dir" $init $ARGS >> "$out_dir/train.log" 2>&1 &
  else
    $PY train.py $args --out_dir="$out_dir" $init $ARGS >> "$out_dir/train.log" 2>&1 &
  fi
  pid=$!
  wait "$pid"; status=$?
  if [ "$stopping" = 1 ]; then wait "$pid"; status=$?; fi  # a signal to this script interrupts wait: wait for the save
  pid=
  say "$out_dir: exit $status, $(grep -E '^test loss|^error' "$out_dir/train.log" | tail -1)"
  if finished "$out_dir"; then
    n_finished=$((n_finished + 1))
  elif [ "$status" != 124 ] && [ "$status" != 130 ] && [ "$status" != 143 ]; then
    n_failed=$((n_failed + 1))  # not stopped by the budget (timeout: 124) or a signal (saved: 130, 143)
  fi
done < "$queue"
say "done: $n_finished finished, $n_skipped skipped (failed before), $n_failed failed now," \
  "$((n_total - n_finished - n_skipped - n_failed)) left"
