#!/usr/bin/env bash
# Usage: benchmarks/sigterm_save.sh (from the repository root; writes /tmp/sigterm-*). Results: benchmarks/RESULTS.md.
# For each tiny preset: train the quickstart config, SIGTERM it after 20 logged steps, report the save time and time to exit.
set -u
for preset in llama3.1-tiny llama4-tiny; do
  for trial in 1 2 3; do
    dir=/tmp/sigterm-$preset-$trial; rm -rf "$dir"
    OMP_NUM_THREADS=1 .venv/bin/python -m experiments.cli train experiments/configs/quickstart.yaml model=$preset \
      run_dir=$dir train.max_steps=100000 train.log_every=1 train.save_every=0 train.progress=false >/dev/null 2>"$dir.err" &
    pid=$!
    until [ "$(wc -l < $dir/metrics.jsonl 2>/dev/null || echo 0)" -ge 20 ]; do sleep 0.2; done
    t0=$(date +%s.%N); kill -TERM $pid; wait $pid; rc=$?; t1=$(date +%s.%N)
    echo "$preset trial $trial: exit $rc, signal->exit $(echo "$t1 - $t0" | bc) s, $(grep -o 'step_[0-9]* ([0-9.]* s)' $dir.err), $(du -sh $dir/checkpoints/step_* | cut -f1)"
  done
done
