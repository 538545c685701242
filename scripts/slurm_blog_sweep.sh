#!/usr/bin/env bash
# Example: the full OPUS-100 sweep of configs/blog.yaml on a Slurm cluster.
#
# Two ways to run it. Both only call the mtprune command line; nothing here talks to Slurm itself.
#
# 1. Let mtprune submit everything (through submitit) and return at once. Each stage waits for the
#    one before it (job dependencies); proxy seeds, score shards and retraining runs are job arrays.
#    Rerunning the same command after a failure or preemption resubmits only what is not finished.
#
#      mtprune sweep -c configs/blog.yaml --launcher slurm \
#          --set download.source=local:/data/opus-100 \
#          --set launch.slurm.partition=gpu --set launch.slurm.account=my-account \
#          --set launch.slurm.gpus_per_node=8 --set launch.score_shards=8
#      mtprune status -c configs/blog.yaml          # fresh / stale per stage, and every job's state
#
# 2. Submit by hand: write one plain sbatch script per stage (plus, for the stages with a job array,
#    the job that runs after the array) and chain them with dependencies. Each script runs the same
#    command line, with the same sbatch options, as option 1 would submit, and reads a snapshot of the
#    config under <run>/slurm/ that no later command rewrites.
set -euo pipefail
cfg=(-c configs/blog.yaml --set download.source=local:/data/opus-100
     --set launch.slurm.partition=gpu --set launch.slurm.gpus_per_node=8)
mkdir -p sbatch
for stage in download prepare proxy score prune train evaluate report; do
  mtprune slurm-script "$stage" "${cfg[@]}" > "sbatch/$stage.sbatch"
done
for stage in proxy score train; do  # merges the units and writes the stage's manifest; holds no GPUs
  mtprune slurm-script "$stage" --finish "${cfg[@]}" > "sbatch/$stage-finish.sbatch"
done
# each job starts only when the one before succeeded; a failed one cancels the rest (kill-on-invalid-dep)
prev=""
for script in download prepare proxy proxy-finish score score-finish prune train train-finish evaluate report; do
  prev=$(sbatch --parsable ${prev:+--dependency=afterok:"$prev"} "sbatch/$script.sbatch")
  prev=${prev%%;*}  # --parsable prints "id;cluster" on multi-cluster setups
done
echo "submitted; the sweep ends with job $prev (squeue -u \"\$USER\" shows the jobs, mtprune status the stages)"
