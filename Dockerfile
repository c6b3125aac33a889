# gpu-pipeline appliance image.  Run with the NVIDIA runtime:
#   docker build -t gpu-pipeline .
#   docker run --rm --gpus all -v $PWD/data:/data gpu-pipeline run --sink chdb:///data/clickhouse
# Without --gpus the same image runs the CPU engine.
FROM nvidia/cuda:12.5.1-devel-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 \
    GPU_PIPELINE_CACHE_DIR=/opt/gpu-pipeline/cache
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev g++ make kcat ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/gpu-pipeline
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY gpu_pipeline ./gpu_pipeline
COPY kernels ./kernels
RUN pip install --no-cache-dir --upgrade pip \
    && pip install --no-cache-dir -e '.[gpu,s3]' --extra-index-url=https://pypi.nvidia.com \
    && pip install --no-cache-dir cuda-bindings nvidia-cuda-nvrtc-cu12 \
    && python -c "from gpu_pipeline.backend.kernels import load_cpu; load_cpu()"
COPY notebooks ./notebooks
COPY benchmarks ./benchmarks

VOLUME ["/data"]
WORKDIR /data
ENTRYPOINT ["gpu-pipeline"]
CMD ["run", "--sink", "chdb:///data/clickhouse", "--checkpoint-dir", "/data/checkpoints"]
