#!/bin/bash
# The GPU checks of issues 3 and 4 as one script for the `device` tool (bench/README.md has the figures).
# Needs diffusers as a wheel (the device image has none): put it under .gpu/wheels/ (git-ignored), and
# call with carry [".gpu"] and timeout_s 580. Each stage writes its JSON under $OUT as soon as it ends.
#   ORDER  attention kernel priority to use (default: measured first by bench/attention.py)
python3 -m pip install --no-deps --no-index -q .gpu/wheels/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
T0=$(date +%s); left() { echo $(( $1 - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ -z "$ORDER" ]; then
  timeout 60 python3 bench/attention.py --out $OUT/attention.json 2>&1 | grep '^{' | cut -c1-600
  ORDER=$(python3 -c "import json;print(','.join(json.load(open('$OUT/attention.json'))['backward']['best_order']))")
fi
echo "attention order: $ORDER"
# the compiled RL epoch first (its compilation alone took over 4.5 minutes on an H200), then the plain
# loop on the same machine; the runner's compiled figure needs a call of its own
timeout $(left 420) python3 bench/rl_epoch.py --variants ours_compiled --attention "$ORDER" \
  --out $OUT/rl_epoch_sd15_compiled.json 2>&1 | grep '^{'
timeout $(left 570) python3 bench/rl_epoch.py --variants plain --out $OUT/rl_epoch_sd15_plain.json 2>&1 | grep '^{'
echo "done in $(( $(date +%s) - T0 )) s"
