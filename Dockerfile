# ssltrain on NVIDIA's NGC PyTorch image. CUDA, NCCL, PyTorch, torchvision, Triton, DALI and apex come from the image
# (25.12: CUDA 13.1, PyTorch 2.10, Python 3.12); pip adds only what the image lacks and never replaces its torch.
#   docker build -t ssltrain .
#   docker run --gpus all --ipc host -v "$PWD:/workspace" ssltrain \
#       launch local /opt/ssltrain/configs/vicreg_resnet50_imagenet.yaml data.train=shards/in1k --nproc 8
# Multi-node and the other options: docs/docker.md. tests/test_docker.py lints this file and dry-runs its pip commands.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# ffmpeg decodes video for `ssltrain shards video` and data.modality=video. Its version is the base image's Ubuntu's
# (DL3008, pin apt versions, would break on every base image update).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/ssltrain
COPY pyproject.toml README.md ./
COPY ssltrain/ ssltrain/
COPY kernels/ kernels/
COPY launch/ launch/
COPY configs/ configs/

# The wheel is built outside the image's pip constraints (/etc/pip/constraint.txt, which may pin an older setuptools
# than the build needs); installing it is held by them, so a dependency that wants another torch fails the build
# instead of replacing the image's. The last line checks that torch is the image's own, byte for byte. The versions
# are pyproject.toml's ranges under the image's pins (DL3013, pin pip versions, does not apply).
# hadolint ignore=DL3013
RUN python -c "import torch; print(torch.__version__)" > /tmp/torch-version \
 && env -u PIP_CONSTRAINT pip wheel --no-deps --no-cache-dir --wheel-dir /tmp/wheels . \
 && pip install --no-cache-dir --constraint /etc/pip/constraint.txt /tmp/wheels/ssltrain-*.whl "ssltrain[wandb]" \
 && rm -rf /tmp/wheels \
 && python -c "import torch; print(torch.__version__)" | cmp - /tmp/torch-version \
 && ssltrain --help > /dev/null

# Mount a project directory here (-v "$PWD:/workspace"): relative data/, runs/ and configs resolve in it. The
# shipped recipes are in /opt/ssltrain/configs.
WORKDIR /workspace
ENTRYPOINT ["ssltrain"]
CMD ["--help"]
