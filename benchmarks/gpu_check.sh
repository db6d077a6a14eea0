#!/usr/bin/env bash
# The GPU checks in one run: the gpu-marked tests, bench_gpu.py on the device-resident
# engine and on the host-blending engine, and the CPU path on the same machine's cores.
#
#   benchmarks/gpu_check.sh LOGDIR
#
# Needs the package importable (installed, or on PYTHONPATH) and torch with CUDA.
# Each step has its own time limit, so one failure still leaves the others' logs.
set -u
log=${1:?usage: gpu_check.sh LOGDIR}
mkdir -p "$log"
export PYTHONUNBUFFERED=1 GEOSEG_CACHE=${GEOSEG_CACHE:-$(mktemp -d)}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc;
  python3 -c "import torch, numpy, rasterio; print(torch.__version__, numpy.__version__, rasterio.__version__)"; } \
  2>&1 | tee "$log/env.txt"
python3 -m compileall -q -j 0 geoseg ${PYTHONPATH:+${PYTHONPATH//:/ }} > /dev/null 2>&1  # as an installed package would be
steps=${GPU_CHECK_STEPS:-bench-device tests bench-blocks profile bench-cpu}
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  [[ " $steps " == *" $name "* ]] || return 0
  local t0=$SECONDS
  timeout "$secs" "$@" > "$log/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s"; tail -n 25 "$log/$name.log"
}
step bench-device 200 python3 benchmarks/bench_gpu.py --sizes 8192 16384
step tests 120 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
step bench-blocks 60 python3 benchmarks/bench_gpu.py --sizes 8192 --engine blocks
if [[ " $steps " == *" profile "* ]]; then
vrt=$(mktemp -d)/mosaic.vrt
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from common import mosaic_vrt; from pathlib import Path; \
mosaic_vrt(Path('data/scenes/field-ortho.tif').resolve(), Path('$vrt'), ${GPU_CHECK_SIZE:-8192}, [1, 2, 3])"
prof=$(dirname "$vrt")/predict.prof
step profile 60 python3 -m cProfile -o "$prof" -m geoseg predict "$vrt" -o "$(dirname "$vrt")/p" --bands 1,2,3 \
  --no-polygons --gsd off --engine device --batch-size 64 --overwrite -q
python3 -c "import pstats; pstats.Stats('$prof').sort_stats('tottime').print_stats(30)" > "$log/profile.txt" 2>&1
head -n 60 "$log/profile.txt"
fi
step bench-cpu 90 python3 benchmarks/bench_gpu.py --device cpu --engine blocks --precision fp32 --batch-size 4 \
  --sizes 8192
