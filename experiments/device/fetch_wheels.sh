#!/usr/bin/env bash
# Downloads, on the development machine, the wheels the GPU machine's image lacks for the search
# and the population and fuzz tests (its python3 is 3.12 and holds torch, numpy, pytest, huggingface_hub,
# safetensors, scikit-learn, torchmetrics, ...; not diffusers or deap), and nvidia-cutlass, whose
# CUTLASS/CuTe headers the build needs for fused_conv2d's Hopper kernels (pure Python + headers,
# 6.4 MB; installed --no-deps: only its headers are used). They go to .whl/ (ignored by git),
# which a device call carries: run(..., carry=[".whl"]).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
grep -qx '/.whl/' .git/info/exclude 2> /dev/null || grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
for spec in diffusers==0.42.1 deap==1.4.4 moocore==0.3.2 cffi==2.1.1 pycparser==3.12 \
            platformdirs==4.14.8 importlib_metadata==10.2.0 hypothesis==6.170.17 sortedcontainers==2.4.0 \
            nvidia-cutlass==4.2.0.0; do
  "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 -d .whl "$spec"
done
ls -la .whl
du -sh .whl
