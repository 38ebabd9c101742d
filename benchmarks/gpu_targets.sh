#!/usr/bin/env bash
# The GPU measurements behind the speed targets, in one go (about 25 minutes on one H100).
#
#   bash benchmarks/gpu_targets.sh OUT_DIR [step|default-run|tradeoff|all]
#
# Needs a CUDA device and Fashion-MNIST (the four .gz files in $LOCALSGD_DATA or a standard place).
# Every comparison is measured side by side in one process (bench step interleaves its arms) or as
# runs of the same command that differ in one flag. Results: OUT_DIR/*.txt, *.json and run folders.
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu_targets.sh OUT_DIR [step|default-run|tradeoff|all]}
what=${2:-all}
mkdir -p "$out"
run() { echo "+ $*" | tee -a "$out/commands.txt"; "$@"; }
py="python3 -m localsgd_fx"

if [[ $what == step || $what == all ]]; then
  # per-step ratio to plain SGD in the same settings, full prefix included, with compile seconds per t
  run $py bench step --model resnet50 --in-channels 3 --image-size 64 --batch-size 128 --amp bf16 --channels-last \
      --compile on --repeats 21 --json "$out/step_resnet50_bf16_cl_compiled.json" | tee "$out/step_resnet50_bf16_cl_compiled.txt"
  run $py bench step --model resnet50 --in-channels 3 --image-size 64 --batch-size 128 --amp bf16 --channels-last \
      --compile reduce-overhead --repeats 21 --json "$out/step_resnet50_bf16_cl_graphs.json" | tee "$out/step_resnet50_bf16_cl_graphs.txt"
  run $py bench step --model resnet20 --compile reduce-overhead --repeats 31 \
      --json "$out/step_resnet20_graphs.json" | tee "$out/step_resnet20_graphs.txt"
  run $py bench step --model resnet20 --compile off --repeats 31 \
      --json "$out/step_resnet20_eager.json" | tee "$out/step_resnet20_eager.txt"
  run $py bench step --model resnet20 --rule freeze --compile reduce-overhead --repeats 31 \
      --json "$out/step_resnet20_freeze_graphs.json" | tee "$out/step_resnet20_freeze_graphs.txt"
fi

if [[ $what == default-run || $what == all ]]; then
  # the default run with compile auto vs off: wall time and what auto decided
  for mode in off auto; do
    start=$(date +%s.%N)
    run $py train --device cuda --compile "$mode" --no-progress --out "$out/default_compile_$mode" --overwrite \
        | tee "$out/default_compile_$mode.txt"
    echo "wall_s $(echo "$(date +%s.%N) - $start" | bc)" | tee -a "$out/default_compile_$mode.txt"
  done
  # a run where compiling pays: t fixed (plain SGD schedule), ResNet-50 bf16 at 64x64 needs CIFAR; on
  # Fashion-MNIST use ResNet-50 with the full training split, 3 epochs
  for mode in off auto; do
    start=$(date +%s.%N)
    run $py train --device cuda --model resnet50 --schedule sgd --train-subset 0 --epochs 3 --amp bf16 --channels-last \
        --compile "$mode" --no-progress --out "$out/resnet50_sgd_compile_$mode" --overwrite | tee "$out/resnet50_sgd_compile_$mode.txt"
    echo "wall_s $(echo "$(date +%s.%N) - $start" | bc)" | tee -a "$out/resnet50_sgd_compile_$mode.txt"
  done
fi

if [[ $what == tradeoff || $what == all ]]; then
  # end to end on CUDA, full Fashion-MNIST, 20 epochs: SGD vs LoCal vs its freeze twin, fastest plain setup
  run $py bench tradeoff --device cuda --train-subset 0 --test-subset 0 --epochs 20 --seeds 0 \
      --arms SGD "LoCal dynamic" "freeze dynamic" --amp bf16 --channels-last --compile auto --out "$out/tradeoff_full"
fi
