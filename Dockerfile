# The image every node of a megl_ray Ray cluster runs (cluster/aws-gpu.yaml, cluster/gcp-gpu.yaml, cluster/kuberay/).
#
# image: ghcr.io/CHANGE-ME/megl-ray:0.2.0
# CHANGE ME: the registry and owner you push to (the tag follows the project version). The cluster files name this
# exact image; change them together (tests/test_deploy.py checks that they agree).
#   docker build -t ghcr.io/CHANGE-ME/megl-ray:0.2.0 .
#   docker push ghcr.io/CHANGE-ME/megl-ray:0.2.0
#
# Base: Ray's own GPU image. Its Ray (2.60.0) and Python (3.11) must match pyproject's pin and the machine that runs
# `ray up` / `ray job submit`; CUDA 12.8 (toolkit with nvcc) runs on NVIDIA drivers >= 570, and the image has the
# non-root user `ray` whose conda Python we install into.
FROM rayproject/ray:2.60.0-py311-cu128

LABEL org.opencontainers.image.title="megl-ray" \
      org.opencontainers.image.version="0.2.0" \
      org.opencontainers.image.description="MEGL training on Ray Train + DeepSpeed" \
      org.opencontainers.image.licenses="Apache-2.0"

# torch from PyTorch's CUDA 12.8 index, not PyPI: PyPI's torch is built for CUDA 13, which needs drivers >= 580 on
# every node and does not match this image's nvcc should DeepSpeed ever JIT-compile an op.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG DEEPSPEED_VERSION=0.19.8

# DeepSpeed ops: none pre-built. The trainer hands DeepSpeed its own torch AdamW (megl_ray/training/optim.py) with
# ZeRO-2/3, bf16 and NCCL, so no DeepSpeed extension is loaded on GPU nodes; pre-building FUSED_ADAM, CPU_ADAM or UTILS
# would add many minutes of nvcc to every build and hundreds of MB to the image. train.offload=cpu uses DeepSpeed's
# CPU Adam, JIT-compiled once per node into TORCH_EXTENSIONS_DIR (about a minute; the compiler and ninja are in the
# image), or rebuild with DS_BUILD_CPU_ADAM=1 and `pip install --no-build-isolation deepspeed`.
ENV DS_BUILD_OPS=0 \
    TORCH_EXTENSIONS_DIR=/home/ray/.cache/torch_extensions \
    PYTHONUNBUFFERED=1

# EFA between nodes (cluster/aws-gpu.yaml's p5 nodes, EKS with the EFA device plugin): libfabric and the aws-ofi-nccl
# NCCL plugin from AWS's EFA installer, user space only (--skip-kmod: the host AMI's driver serves the container).
# Without them NCCL falls back to TCP sockets across nodes (docs/scaling.md, "Fabric"). Harmless elsewhere: NCCL uses
# the plugin only where libfabric finds an EFA device.
ARG EFA_INSTALLER_VERSION=1.38.0
USER 0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3003
RUN curl -fsSL "https://efa-installer.amazonaws.com/aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" | tar -xz -C /tmp \
 && cd /tmp/aws-efa-installer \
 && ./efa_installer.sh -y -g --skip-kmod --skip-limit-conf --no-verify \
 && cd / && rm -rf /tmp/aws-efa-installer /var/lib/apt/lists/* \
 && ls /opt/amazon/efa/lib/libfabric.so* /opt/amazon/ofi-nccl/lib/*/libnccl-net*.so
ENV LD_LIBRARY_PATH=/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu:/opt/amazon/efa/lib:${LD_LIBRARY_PATH} \
    PATH=/opt/amazon/efa/bin:${PATH}

# The base image's `ray` user, by number so that Kubernetes' runAsNonRoot can verify it is not root.
USER 1000:100

# The heavy, rarely changing layer first, so that a code change rebuilds only the last one. The source directory is
# made here by `ray` (pip builds in it; WORKDIR would create it as root with some builders).
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && pip install --no-cache-dir "deepspeed==${DEEPSPEED_VERSION}" \
 && mkdir /home/ray/megl_ray

# The project, installed from its source with its tracking extra (MLflow, W&B: run.tracking works on the cluster);
# the source stays here, the working directory of `ray start` and so of every job, so
# `--config megl_ray/config/presets/<name>.yaml` resolves as it does in a checkout.
WORKDIR /home/ray/megl_ray
COPY --chown=1000:100 . .
RUN pip install --no-cache-dir "./[tracking]" \
 && python -c "import ray, torch; assert ray.__version__ == '2.60.0', ray.__version__; assert torch.version.cuda.startswith('12.8'), torch.version.cuda"
