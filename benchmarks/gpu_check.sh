#!/usr/bin/env bash
# The whole GPU check in one command (issues 12, 20): CUDA tests, training throughput of the real data path with CPU
# and with GPU augmentation (with and without torch.compile), and the four models trained on real HAM10000.
# Sized for one lent GPU session (15 minutes of device time, starts included; benchmarks/gpu_check.py's PLAN_S):
# about 2 min start + 530 s for this command (env 10, tests 110, throughput 170, train 230, overhead 10) + 240 s
# kept for one rerun of any one section (--only SECTION, at once, while the machine is warm).
#
#   benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--data HAM_DIR] [--split CSV] [--budget SECONDS] [--only LIST]
#
#   --dry-run   the same script end to end on the CPU at toy sizes (tiny images, few images, gloo, no compile, GPU
#               augmentation run on the CPU); run by tests/test_gpu_check_dryrun.py in `make test`. Without --data
#               it makes synthetic images.
#   --out DIR   results: gpu_check.md (a docs/benchmarks.md section), gpu_check.json (plan + every section),
#               gpu_check.log, gpu_throughput.json and gpu_train.json (rewritten after every number / model, so a
#               timeout keeps what finished), gpu_ham_predictions.csv. Default: $OUT when set (the device tool's
#               output folder), else ./gpu-check-out.
#   --data DIR  a HAM10000-layout folder. Default: .gpudata/ham10000-200x150, else ../shared/data/ham10000-200x150.
#   --split CSV default: .gpudata/splits.csv when present (copy the CPU baseline's splits.csv there).
#   --budget S  seconds for the sections together (default 530, the plan; a smaller one shrinks every cap).
#   --only LIST comma list of env,tests,throughput,train (a rerun of the sections that failed).
#
# On a machine without LesionLab installed it runs from the checkout (PYTHONPATH=.); wheels in .whl/ (e.g.
# grad-cam, ttach) are installed into a temporary folder first when grad-cam is missing.
set -uo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-gpu-check-out}"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --dry-run|--data|--split|--budget|--only)
      if [ "$1" = --dry-run ]; then args+=("$1"); shift; else args+=("$1" "$2"); shift 2; fi ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case " ${args[*]-} " in
  *" --data "*) ;;
  *) for d in .gpudata/ham10000-200x150 ../shared/data/ham10000-200x150; do
       if [ -f "$d/HAM10000_metadata.csv" ]; then
         case " ${args[*]-} " in *" --dry-run "*) ;; *) args+=(--data "$d") ;; esac
         break
       fi
     done ;;
esac
case " ${args[*]-} " in
  *" --split "*|*" --dry-run "*) ;;
  *) [ -f .gpudata/splits.csv ] && args+=(--split .gpudata/splits.csv) ;;
esac

source benchmarks/python_env.sh
mkdir -p "$out"
"$py" benchmarks/gpu_check.py --out "$out" --command "benchmarks/gpu_check.sh ${args[*]-}" "${args[@]}" 2>&1 \
  | tee "$out/gpu_check.log"
