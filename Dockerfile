# molmo-backend: the Label Studio ML backend that pre-annotates keypoints with Molmo.
#
#   docker build -t molmo-backend .                         # Molmo2 (transformers 5.x), default
#   docker build -t molmo-backend:molmo1 --build-arg PROFILE=molmo1 .   # Molmo v1 (transformers 4.5x)
#   docker run --gpus all -p 9090:9090 -v molmo-hf:/data/hf \
#       -e LABEL_STUDIO_URL=http://label-studio:8080 -e LABEL_STUDIO_API_KEY=... molmo-backend
#
# Every setting is an environment variable (`molmo-backend serve --help` lists them all); nothing
# is baked in but the defaults below. Model weights are downloaded at first start into $HF_HOME,
# a volume, so they survive container rebuilds. See docs/label-studio.md and docker-compose.yml.

# Pin the base by tag here; for byte-for-byte rebuilds pin its digest too
# (--build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# An unprivileged user with a fixed uid/gid (match it when bind-mounting a host cache folder).
ARG UID=1000
ARG GID=1000
RUN groupadd --gid "${GID}" molmo \
    && useradd --uid "${UID}" --gid "${GID}" --create-home --home-dir /home/molmo --shell /usr/sbin/nologin molmo

# A C compiler: Triton builds its kernels' launchers with one at first use (the split-key decode
# attention, MOLMO_TRITON_KERNELS); without it the engine falls back to CUTLASS's slower kernel.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first, from the pinned files only, so that code changes do not reinstall them.
# torch and torchvision (5.5 GB with their CUDA libraries) get a layer of their own, made before
# PROFILE is declared: both profiles pin the same versions, so their images share that layer (one
# copy on disk, one download) and the profile's layer holds only what differs.
COPY requirements*.txt ./
RUN grep -E '^(torch|torchvision)==' requirements.txt > /tmp/torch.txt \
    && python -m pip install --no-cache-dir -r /tmp/torch.txt \
    && rm /tmp/torch.txt

# Install profile: which pinned requirement set goes in.
#   molmo2 (default) -> requirements.txt        Molmo2 checkpoints, transformers 5.x (native molmo2)
#   molmo1           -> requirements-molmo1.txt Molmo v1 checkpoints (remote code, transformers 4.5x)
ARG PROFILE=molmo2
RUN set -eu; \
    case "${PROFILE}" in \
      molmo2) req=requirements.txt ;; \
      molmo1) req=requirements-molmo1.txt ;; \
      *) echo "unknown PROFILE=${PROFILE}: use molmo2 or molmo1" >&2; exit 2 ;; \
    esac; \
    test -f "${req}" || { echo "${req} is missing from the build context" >&2; exit 2; }; \
    python -m pip install --no-cache-dir -r "${req}"; \
    echo "${PROFILE}" > /app/PROFILE

# The package itself, without touching the pinned dependencies.
COPY pyproject.toml README* ./
COPY molmo_backend ./molmo_backend
RUN python -m pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info

# Hugging Face cache (model weights, and the demo model) on a volume owned by the runtime user;
# torch.compile's and Triton's kernel caches beside it, so a restart reuses compiled kernels.
ENV HF_HOME=/data/hf \
    TORCHINDUCTOR_CACHE_DIR=/data/hf/torchinductor \
    TRITON_CACHE_DIR=/data/hf/triton \
    HOST=0.0.0.0 \
    PORT=9090 \
    LOG_FORMAT=json \
    MOLMO_PROFILE=${PROFILE}
RUN mkdir -p /data/hf && chown -R molmo:molmo /data/hf
VOLUME ["/data/hf"]

USER molmo
EXPOSE 9090

# /health answers 200 once the model is loaded (503 while it loads, 500 if loading failed). The
# first start downloads the weights (Molmo2-4B about 9 GB) and compiles the decode step
# (MOLMO_COMPILE, minutes), hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request\ntry:\n    r = urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '9090'), timeout=4)\n    sys.exit(0 if r.status == 200 else 1)\nexcept Exception as e:\n    print(e)\n    sys.exit(1)"]

# gunicorn (one worker holding the model, THREADS threads) started by the CLI; SIGTERM stops it
# gracefully.
STOPSIGNAL SIGTERM
ENTRYPOINT ["molmo-backend"]
CMD ["serve"]
