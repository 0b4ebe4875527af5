# The image a cluster runs: CUDA PyTorch + normlab, `normlab` as the entrypoint.
#   docker build -t normlab:0.1.0 .
#   docker run --gpus all -v "$PWD/work:/work" normlab:0.1.0 train model.norm=gn:groups=8
# The base is pinned by tag (never `latest`) so that every node of a sweep runs the same
# PyTorch, CUDA and cuDNN; docs/trainer.md explains how to run it under Slurm.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/normlab
COPY pyproject.toml README.md ./
COPY normlayers ./normlayers
COPY trainer ./trainer
COPY cluster ./cluster
COPY configs ./configs
# Keep the base image's CUDA build of torch: pin it, so pip never swaps in another build.
RUN python -m pip freeze | grep -i '^torch==' > /tmp/torch-constraint.txt \
    && python -m pip install --constraint /tmp/torch-constraint.txt . \
    && rm /tmp/torch-constraint.txt

RUN useradd --create-home --uid 1000 --shell /bin/bash normlab \
    && mkdir -p /work && chown normlab:normlab /work
USER 1000:1000
# Runs (runs/), the default MLflow store (mlflow.db) and checkpoints land in /work: mount it.
WORKDIR /work

ENTRYPOINT ["normlab"]
CMD ["--help"]
