# gpu-pipeline appliance image: the GPU engine (CuPy + NVRTC, cuDF) and the CPU engine
# (C++/OpenMP kernels, prebuilt here) in one image, run by a non-root user.
#
#   docker build -t gpu-pipeline .
#   docker run --rm --gpus all -v gpu-pipeline-data:/data gpu-pipeline          # GPU engine
#   docker run --rm -v gpu-pipeline-data:/data gpu-pipeline                     # CPU engine
#
# The default command runs the synthetic job into embedded ClickHouse under /data and
# serves Prometheus metrics on 9400, which the health check reads.  README, "Deployment".
#
# Versions: the CUDA 12.9 base matches the CUDA 12.9 wheels that cuDF and CuPy bring, and
# the project's Python dependencies are pinned below (resolved together with pip; their own
# dependencies resolve at build time and `pip check` verifies the set).

ARG CUDA_VERSION=12.9.1
ARG UBUNTU=ubuntu24.04

# ---------------------------------------------------------------------------- builder
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS builder

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    GPU_PIPELINE_KERNELS_DIR=/opt/gpu-pipeline/kernels \
    GPU_PIPELINE_CACHE_DIR=/opt/gpu-pipeline/cache

# Ubuntu's archive keeps only the newest build of a package in -updates and -security, so
# exact apt pins break the build within weeks; the base image tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv g++ \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv \
    && pip install pip==26.3 setuptools==84.2.1

# The runtime dependencies of pyproject.toml with the gpu and s3 extras, plus NVRTC for
# CuPy and `gpu-pipeline doctor`; dask/distributed are the versions RAPIDS 26.10 requires.
RUN pip install \
        numpy==2.4.6 \
        pyarrow==26.0.1 \
        orjson==3.13.0 \
        clickhouse-connect==1.12.0 \
        chdb==4.4.0 \
        chdb-core==26.9.0 \
        confluent-kafka==2.16.1 \
        rich==15.0.0 \
        psutil==7.2.2 \
        prometheus-client==0.26.0 \
        dask==2026.7.1 \
        distributed==2026.7.1 \
        fsspec==2026.9.0 \
        bokeh==3.9.2 \
        s3fs==2026.9.0 \
        cupy-cuda12x==14.2.0 \
        cudf-cu12==26.10.2 \
        dask-cuda==26.10.0 \
        cuda-bindings==12.9.10 \
        nvidia-cuda-nvrtc-cu12==12.9.86

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gpu_pipeline ./gpu_pipeline
RUN pip install --no-deps --no-build-isolation . && pip check

# The CPU kernels, compiled once here.  The cache key is the SHA-256 of the kernel source
# text, the compiler name (CXX, default g++) and the flags: the runtime stage has the same
# sources and settings, so it finds the library and never needs a compiler.
COPY kernels /opt/gpu-pipeline/kernels
RUN python -c "from gpu_pipeline.backend.kernels import load_cpu; print(load_cpu().names)"

# ---------------------------------------------------------------------------- runtime
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}

ARG CUDA_VERSION
ARG UBUNTU
ARG VERSION=0.1.0
ARG REVISION=""
ARG CREATED=""
LABEL org.opencontainers.image.title="gpu-pipeline" \
      org.opencontainers.image.description="GPU-accelerated clickstream pipeline: Kafka micro-batches to ClickHouse through custom CUDA kernels, with a CPU build of the same kernels" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    GPU_PIPELINE_KERNELS_DIR=/opt/gpu-pipeline/kernels \
    GPU_PIPELINE_CACHE_DIR=/opt/gpu-pipeline/cache \
    CUPY_CACHE_DIR=/tmp/cupy-kernel-cache

# python3: the venv's interpreter (same release as the builder's); libgomp1: OpenMP for
# the prebuilt CPU kernels; kcat: feed a topic by hand.  No compiler (see the builder).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 kcat ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# UID 1000 (the usual first host user, for bind mounts); Ubuntu's image ships `ubuntu` there.
RUN if id ubuntu > /dev/null 2>&1; then userdel --remove ubuntu; fi \
    && groupadd --gid 1000 pipeline \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash pipeline \
    && mkdir -p /data \
    && chown pipeline:pipeline /data

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/gpu-pipeline /opt/gpu-pipeline

# Fails the build if the kernels would have to be compiled here.
RUN python -c "from gpu_pipeline.backend.kernels import load_cpu; load_cpu()" \
    && gpu-pipeline --version

# Numeric, so that runtimes that check for a non-root user (runAsNonRoot) can tell.
USER 1000:1000
WORKDIR /data
VOLUME ["/data"]
EXPOSE 9400

# Healthy while `run` serves metrics (port GPU_PIPELINE_METRICS_PORT, default 9400).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=4 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % (os.environ.get('GPU_PIPELINE_METRICS_PORT') or '9400'), timeout=4)"]

ENTRYPOINT ["gpu-pipeline"]
CMD ["run", "--sink", "chdb:///data/clickhouse", "--checkpoint-dir", "/data/checkpoints", "--metrics-port", "9400"]
