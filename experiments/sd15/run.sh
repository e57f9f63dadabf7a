#!/usr/bin/env bash
# The SD-v1.5-shaped architecture-level (text-conditional, latent) run in one command: make the
# random-weight StableDiffusionPipeline teacher (unet/, vae/, scheduler/; no text encoder) at the run's
# width and the random text-states file (if missing), run the DiffNAS search data-free on 4x64x64
# latents, then the checks and the table (check.py).
#
#   nice -n 19 bash experiments/sd15/run.sh                    # from the repository root
#   WIDTH=2 OUT=runs/sd15/w2 bash experiments/sd15/run.sh --set distill.steps=2
#
# WIDTH divides SD-v1.5's block widths (4: 80,160,320,320, the width this config was run at; 1 is the
# real UNet, whose distillation does not fit in this machine's memory: README.md). Extra arguments go
# to `python -m pyevo.search` (e.g. --quiet, --set KEY=VALUE, --resume).
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=experiments/sd15
PYTHON=${PYTHON:-.venv/bin/python}
WIDTH=${WIDTH:-4}
ROOT=${ROOT:-runs/sd15}                  # runs/ is ignored by git: no weights get committed
TEACHER=$ROOT/teacher_w$WIDTH
CONDITIONS=$ROOT/conditions.safetensors
OUT=${OUT:-$ROOT/run_w$WIDTH}
export HF_HUB_OFFLINE=1                  # local folders only; a hub id would hang, then fail

if [[ ! -f $TEACHER/unet/config.json || ! -f $CONDITIONS ]]; then
    "$PYTHON" $HERE/make_teacher.py --out "$TEACHER" --width-divisor "$WIDTH" --conditions "$CONDITIONS"
fi

# The machine's load before the run goes into the table: a busy machine skews every timing.
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
echo "load average before: $LOAD_BEFORE"
START=$(date +%s)
"$PYTHON" -m pyevo.search --config $HERE/config.yaml --teacher "$TEACHER" --conditions "$CONDITIONS" --out "$OUT" "$@"
echo "pyevo.search wall time: $(( $(date +%s) - START )) s"
"$PYTHON" $HERE/check.py --teacher "$TEACHER" --conditions "$CONDITIONS" --run "$OUT" --load-before "$LOAD_BEFORE" \
    ${ARCH_FACTS:+--arch-facts "$ARCH_FACTS"}
echo "total wall time: $(( $(date +%s) - START )) s"
