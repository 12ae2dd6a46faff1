#!/usr/bin/env bash
# Mitigations measured on real data at one identical budget (issue 11, part 3): colour constancy (Shades of Gray,
# p=6) without and with, and test-time augmentation without and with, on the same models.
#
#   benchmarks/mitigations.sh [--data HAM_DIR] [--split CSV] [--config NAME] [--arch ARCH] [--seeds "0 1 2"]
#                             [--device cpu|cuda] [--workers N] [--parallel N] [--max-images N]
#                             [--views "plain tta"] [--robust-workers N] [--set SECTION.KEY=VALUE ...] [--out DIR]
#
# Per arm (data.color_constancy none | shades_of_gray) it trains one model per seed with the config's protocol
# (default: ham10000-cpu-small's budget for timm:resnet18, the study's ResNet-18 member), then runs
# `lesionlab robustness` on the test split over the arm's models, once without and once with --tta: clean metrics
# per image and per lesion with lesion-bootstrap CIs, lesion consistency, and flip rates under every perturbation.
# The two arms differ only in data.color_constancy. Finally benchmarks/mitigations_summary.py writes
# mitigations.md (tables for docs/robustness-ham10000.md) from the four robustness folders.
#
# --views picks the robustness runs (plain: without TTA, tta: with); --robust-workers sets their DataLoader
# processes (default: --workers). --parallel N trains N models at once (on a GPU the CPU-side augmentation is the limit, so several processes with
# a few workers each fill a 16-core machine); each process gets its own image cache folder.
# On a machine without LesionLab installed it runs from the checkout (PYTHONPATH=.), installing the wheels in .whl/
# into a temporary folder when grad-cam is missing (as benchmarks/gpu_check.sh does).
set -uo pipefail
cd "$(dirname "$0")/.."

data=""; split=""; config=ham10000-cpu-small; arch=timm:resnet18; seeds="0 1 2"; device=cpu; workers=1
parallel=1; max_images=0; out="${OUT:-mitigations-out}"; sets=()
views="plain tta"; rworkers=""
while [ $# -gt 0 ]; do
  case "$1" in
    --data) data="$2"; shift 2 ;;
    --split) split="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --arch) arch="$2"; shift 2 ;;
    --seeds) seeds="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --parallel) parallel="$2"; shift 2 ;;
    --max-images) max_images="$2"; shift 2 ;;
    --views) views="$2"; shift 2 ;;
    --robust-workers) rworkers="$2"; shift 2 ;;
    --set) sets+=(--set "$2"); shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "mitigations.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$data" ]; then
  for d in .gpudata/ham10000-200x150 ../shared/data/ham10000-200x150; do
    [ -f "$d/HAM10000_metadata.csv" ] && { data="$d"; break; }
  done
fi
[ -n "$data" ] || { echo "mitigations.sh: no HAM10000 folder found; pass --data DIR" >&2; exit 2; }
if [ -z "$split" ]; then
  for s in .gpudata/splits.csv "$HOME/lesionlab-runs/ham10000-cpu/splits.csv"; do
    [ -f "$s" ] && { split="$s"; break; }
  done
fi
[ -n "$split" ] || { echo "mitigations.sh: no split file found; pass --split CSV (a study's splits.csv)" >&2; exit 2; }

source benchmarks/python_env.sh
lesionlab() { "$py" -m lesionlab.cli "$@"; }

mkdir -p "$out/runs" "$out/logs"
log="$out/mitigations.log"
echo "mitigations.sh: data=$data split=$split config=$config arch=$arch seeds='$seeds' device=$device" | tee "$log"
"$py" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))" | tee -a "$log"
t0=$SECONDS
arms="none shades_of_gray"

train_one() {  # arm seed
  local stem="$1-s$2"
  if [ -f "$out/runs/$stem/done" ]; then echo "train $stem: done before" >>"$log"; return 0; fi
  local t=$SECONDS
  lesionlab train --data "$data" --split "$split" --config "$config" --arch "$arch" --pretrained none --seed "$2" \
    --device "$device" --set data.color_constancy="$1" --set data.num_workers="$workers" \
    --set data.cache_dir="$out/cache-$stem" ${sets[@]+"${sets[@]}"} --out "$out/runs/$stem" >"$out/logs/train-$stem.log" 2>&1 \
    && touch "$out/runs/$stem/done"
  local rc=$?
  echo "train $stem: rc=$rc $((SECONDS - t)) s" >>"$log"
  rm -rf "$out/cache-$stem"
  return $rc
}

jobs_running() { jobs -rp | wc -l; }
for arm in $arms; do
  for s in $seeds; do
    while [ "$(jobs_running)" -ge "$parallel" ]; do sleep 1; done
    train_one "$arm" "$s" &
  done
done
wait
echo "training finished at $((SECONDS - t0)) s" | tee -a "$log"

stem_of() { "$py" -c "import sys; from lesionlab.models import file_stem; print(file_stem(sys.argv[1]))" "$1"; }
model_dir="$(stem_of "$arch")"
robust_one() {  # arm tta_flag
  local name="robustness-$1${2:+-tta}" runs=()
  for s in $seeds; do runs+=("$out/runs/$1-s$s/$model_dir"); done
  local t=$SECONDS
  lesionlab robustness --data "$data" --split "$split" --subset test --config "$config" --runs "${runs[@]}" \
    --set data.color_constancy="$1" --set data.num_workers="${rworkers:-$workers}" --max-images "$max_images" \
    ${sets[@]+"${sets[@]}"} --device "$device" $2 --out "$out/$name" >"$out/logs/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc $((SECONDS - t)) s" >>"$log"
  return $rc
}
for arm in $arms; do
  for view in $views; do
    case "$view" in plain) tta="" ;; tta) tta="--tta" ;; *) echo "mitigations.sh: --views takes plain and tta" >&2; exit 2 ;; esac
    while [ "$(jobs_running)" -ge "$parallel" ]; do sleep 1; done
    robust_one "$arm" "$tta" &
  done
done
wait
echo "robustness finished at $((SECONDS - t0)) s" | tee -a "$log"
"$py" benchmarks/mitigations_summary.py "$out" --command "benchmarks/mitigations.sh --data $data --split $split \
--config $config --arch $arch --seeds '$seeds' --device $device --workers $workers --parallel $parallel \
--max-images $max_images --views '$views'${rworkers:+ --robust-workers $rworkers}${sets[*]+ ${sets[*]}}" >"$out/mitigations.md" 2>>"$log" \
  && echo "summary: $out/mitigations.md" | tee -a "$log" || echo "summary: rc=1 (see above)" >>"$log"
cat "$log"
# Any failed training, robustness run or summary fails the script (each run logs to $out/logs/).
if grep -q "rc=[1-9]" "$log"; then echo "mitigations.sh: some steps failed; see $out/logs/" >&2; exit 1; fi
