#!/usr/bin/env bash
# Ran with an earlier version of the MaMuJoCo script (running-mean/std inputs without
# LayerNorms, per-agent MAPPO critics, 4 envs x 500 steps, actions clipped, not rescaled). With the
# current script these commands train with its current defaults (20 envs x 200 steps, HARL's
# LayerNorms, one critic) and will not reproduce mamujoco_halfcheetah.md. The runs then used
# --actor ind for independent actors, now --hypernet nops.
# First evidence for mappo_hyper_mamujoco.py: HalfCheetah-2x3, 2 seeds each of
# HyperMARL MLP (MAPPO), independent actors (MAPPO), HAPPO (independent actors), FuPS (MAPPO).
# Budget: 500k environment steps per run (the paper trains 10M), paper/HARL hyperparameters
# otherwise (Table 20 + Table 21), evaluation every 50k steps over 10 deterministic episodes.
# Runs one after the other (2-core CPU). With the current code, the same grid and its table come from
# benchmark/launch.py and benchmark/aggregate.py (which reads the runs' summary.json files): `python benchmark/launch.py table4 --only HalfCheetah --seeds 1 2 --budget 500000
# -- --eval-interval 50000 --eval-episodes 10`, then `python benchmark/aggregate.py runs/grids/table4`.
set -euo pipefail
RUNS=${RUNS:-runs/mamujoco_evidence_$(date +%Y%m%d-%H%M%S)}
STEPS=${STEPS:-500000}
for seed in 1 2; do
  for cfg in "mappo mlp" "mappo nops" "happo nops" "mappo fups"; do
    set -- $cfg
    python mappo_hyper_mamujoco.py --task HalfCheetah-2x3 --algo "$1" --hypernet "$2" --seed "$seed" \
      --total-timesteps "$STEPS" --eval-interval 50000 --eval-episodes 10 --print-interval 25 \
      --runs-dir "$RUNS" --save-model --exp-name "evidence"
  done
done
