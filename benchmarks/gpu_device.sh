#!/usr/bin/env bash
# benchmarks/gpu.py on a GPU machine without internet access, where torch (CUDA), transformers, peft and lightning
# are already installed.
#
#   benchmarks/gpu_device.sh download [PYTHON_VERSION]  # on a connected machine, in the checkout: wheels into ./wheels
#   benchmarks/gpu_device.sh [gpu.py options]           # on the GPU machine: install from ./wheels, then the benchmark
#
# PYTHON_VERSION is the GPU machine's (e.g. 3.11; default: this machine's python3). WHEELS=DIR moves the folder
# (about 155 MB), PYTHON=... picks the interpreter. The run: ~0.5 min of installing, then gpu.py's own wall budget
# (--budget-s, 540 s by default) and its report, under a hard stop at 590 s.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-wheels}
PYTHON=${PYTHON:-python3}

# What gpu.py imports beyond that stack: TRL (the baselines), bitsandbytes (QLoRA), Hydra (llmtune's config). Pinned
# to the versions of the CPU smoke run.
NEEDED=(trl==1.16.0 bitsandbytes==0.50.2 hydra-core==1.3.8)
# Hydra's parser runtime is on PyPI as a source archive only: `download` builds it into a wheel.
SOURCE_ONLY=(antlr4-python3-runtime==4.9.3)
# Needs triton, which CUDA builds of torch bring along; the trl_liger arm is skipped, with the reason, without it.
OPTIONAL=(liger-kernel==0.8.5)
# The dependencies of the above that torch does not bring (triton aside), for pip to take from the folder where the
# machine lacks them or has a version too old; what is installed and new enough stays as it is.
DEPENDENCIES=(accelerate==1.16.0 annotated-doc==0.0.7 annotated-types==0.8.0 anyio==4.16.0 click==8.5.1
    datasets==5.2.0 dill==0.4.1 filelock==4.3.1 fsspec==2026.9.0 h11==0.16.0 hf-xet==1.8.0 httpcore2==2.16.2
    httpx2==2.16.2 huggingface-hub==2.4.0 idna==3.20 markdown-it-py==4.3.0 mdurl==0.1.2 multiprocess==0.70.19
    numpy==2.4.6 omegaconf==2.3.1 packaging==26.4 pandas==3.1.1 psutil==7.2.2 pyarrow==26.0.1 pydantic==2.14.4
    pydantic-core==2.50.5 pygments==2.21.0 python-dateutil==4.0.0 pyyaml==6.0.4 regex==2026.11.19 rich==15.0.0
    safetensors==0.8.0 shellingham==1.5.4 tokenizers==0.23.3 tqdm==4.70.1 transformers==5.24.0 truststore==0.10.5
    typer==0.29.2 typing-inspection==0.4.5 tzdata==2026.6 xxhash==4.1.0)

if [[ "${1:-}" == download ]]; then
    version=${2:-$("$PYTHON" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')}
    # pip matches --platform exactly, so every manylinux tag these wheels are published under is named.
    platforms=()
    for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014; do
        platforms+=(--platform "${tag}_x86_64")
    done
    "$PYTHON" -m pip download --no-deps --only-binary=:all: "${platforms[@]}" --python-version "$version" \
        -d "$WHEELS" "${NEEDED[@]}" "${OPTIONAL[@]}" "${DEPENDENCIES[@]}"
    "$PYTHON" -m pip wheel --no-deps -w "$WHEELS" "${SOURCE_ONLY[@]}"
    exit 0
fi

"$PYTHON" -m pip install --no-index --find-links "$WHEELS" "${NEEDED[@]}" "${SOURCE_ONLY[@]}"
"$PYTHON" -m pip install --no-index --find-links "$WHEELS" "${OPTIONAL[@]}" \
    || echo "gpu_device.sh: liger-kernel not installed (no triton?); the trl_liger arm will say so" >&2
timeout 590 "$PYTHON" benchmarks/gpu.py "$@"
