#!/usr/bin/env bash
# The GPU run (bench/gpu.py) on a lent GPU machine, which has torch but no Ray: one device-tool call,
#   run(command="bash bench/gpu.sh", carry=[".gpu"], timeout_s=540)
# after `python bench/gpu_wheels.py` has put the missing wheels in .gpu/wheels here. Figures and the log
# land in $OUT (gpu.json, gpu.log). The dry run on a CPU machine, in a venv with only packages that the
# GPU image has (device tool's KINDS.md) and the same wheels for this Python:
#   python3.11 -m venv /tmp/devsim && /tmp/devsim/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy \
#     pandas pyarrow fsspec pillow scikit-learn scipy matplotlib requests click filelock packaging protobuf \
#     pyyaml msgpack aiohttp grpcio prometheus-client psutil typing-extensions jinja2 cloudpickle uvloop \
#     python-dateutil six attrs nvidia-ml-py tqdm rich pytest
#   python bench/gpu_wheels.py --python 3.11 --dest /tmp/gpu311/wheels
#   PYTHON=/tmp/devsim/bin/python WHEELS=/tmp/gpu311/wheels SITE=/tmp/site311 OUT=/tmp/gpu-out \
#     bash bench/gpu.sh --quick
set -uo pipefail
python=${PYTHON:-python3}
site=${SITE:-/tmp/site}
out=${OUT:-bench/results}
mkdir -p "$out"
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
  "${WHEELS:-.gpu/wheels}"/*.whl || exit
# Ray's workers inherit the path from the driver's environment.
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
"$python" bench/gpu.py --out "$out" "$@" 2>&1 | tee "$out/gpu.log"
