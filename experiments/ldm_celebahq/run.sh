#!/usr/bin/env bash
# The LDM CelebA-HQ-256 architecture-level (latent) run in one command: make the random-weight
# LDMPipeline teacher (unet/, vqvae/, scheduler/) and the 256x256 image folder (if missing), run the
# DiffNAS search on the VQ-f4 latents, then the checks and the table (check.py).
#
#   bash experiments/ldm_celebahq/run.sh                      # from the repository root
#   PYTHON=/path/to/venv/bin/python OUT=runs/ldm_celebahq/try bash experiments/ldm_celebahq/run.sh --set distill.steps=2
#
# Extra arguments go to `python -m pyevo.search` (e.g. --quiet, --set KEY=VALUE, --resume).
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=experiments/ldm_celebahq
PYTHON=${PYTHON:-.venv/bin/python}
ROOT=${ROOT:-runs/ldm_celebahq}          # runs/ is ignored by git: no weights get committed
TEACHER=$ROOT/teacher
IMAGES=$ROOT/images
OUT=${OUT:-$ROOT/run}
export HF_HUB_OFFLINE=1                  # local folders only; a hub id would hang, then fail

if [[ ! -f $TEACHER/unet/config.json || ! -f $IMAGES/SOURCE.txt ]]; then
    "$PYTHON" $HERE/make_teacher.py --out "$TEACHER" --images "$IMAGES"
fi
echo "images: $(cat "$IMAGES/SOURCE.txt")"

# The machine's load before the run goes into the table: a busy machine skews every timing.
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
echo "load average before: $LOAD_BEFORE"
START=$(date +%s)
"$PYTHON" -m pyevo.search --config $HERE/config.yaml --teacher "$TEACHER" --data "$IMAGES" --out "$OUT" "$@"
echo "pyevo.search wall time: $(( $(date +%s) - START )) s"
"$PYTHON" $HERE/check.py --teacher "$TEACHER" --run "$OUT" --load-before "$LOAD_BEFORE"
echo "total wall time: $(( $(date +%s) - START )) s"
