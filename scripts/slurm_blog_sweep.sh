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
# 2. Submit by hand: write one plain sbatch script per stage and chain them with dependencies.
set -euo pipefail
cfg=(-c configs/blog.yaml --set download.source=local:/data/opus-100
     --set launch.slurm.partition=gpu --set launch.slurm.gpus_per_node=8)
mkdir -p sbatch
for stage in download prepare proxy score prune train evaluate report; do
  mtprune slurm-script "$stage" "${cfg[@]}" > "sbatch/$stage.sbatch"
done
# stages with an array (proxy, score, train) are followed by the plain command, which merges the
# units and writes the stage's manifest; each job starts only when the previous one succeeded
prev=$(sbatch --parsable sbatch/download.sbatch)
prev=$(sbatch --parsable --dependency=afterok:"$prev" sbatch/prepare.sbatch)
for stage in proxy score train; do
  if [ "$stage" = train ]; then prev=$(sbatch --parsable --dependency=afterok:"$prev" sbatch/prune.sbatch); fi
  arr=$(sbatch --parsable --dependency=afterok:"$prev" "sbatch/$stage.sbatch")
  prev=$(sbatch --parsable --dependency=afterok:"$arr" --wrap "mtprune $stage ${cfg[*]} --launcher local")
done
prev=$(sbatch --parsable --dependency=afterok:"$prev" sbatch/evaluate.sbatch)
sbatch --dependency=afterok:"$prev" sbatch/report.sbatch
