# carefl coordinator: SuperLink + ServerApp runtime, started by `carefl coordinator start`.
#
# Build from the repository root (the build context must be the repo, see /.dockerignore):
#   docker build -f deploy/docker/coordinator.Dockerfile -t carefl/coordinator:0.1.0 .
# Mounts: /kit   the coordinator's startup kit (read-only)
#         /state SuperLink database and run directories (persistent, writable by UID 10001)
#
# Pinned to a Debian release so a rebuild does not silently change the OS; pin the digest
# (python:3.11-slim-bookworm@sha256:...) once the image is mirrored into the consortium's registry.
FROM python:3.11-slim-bookworm

# FLWR_*: no telemetry, no update check, and the SuperLink never runs `uv sync` on an app's
# dependencies: everything the ServerApp imports is baked into this image.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/carefl

# Dependencies first, so this layer is rebuilt only when the lock file changes.
# requirements.lock.txt pins torch==2.13.0. PyPI's Linux x86_64 torch wheel is the CUDA build
# (plus several GB of nvidia-* wheels), so the CPU build of the same version is taken from PyTorch's
# CPU index first; the coordinator only averages weights and needs no GPU.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY requirements.lock.txt ./
RUN pip install --no-deps --index-url "$TORCH_INDEX" "$(grep '^torch==' requirements.lock.txt)" \
 && pip install -r requirements.lock.txt

# The product itself; its dependencies are already installed exactly as locked. Installed in
# place (-e): this tree with its pyproject.toml is the Flower App that `carefl coordinator run`
# submits and whose hash `carefl coordinator app-hash` prints, so it must stay whole in the image.
COPY pyproject.toml README.md ./
COPY server ./server
COPY client ./client
COPY shared_models ./shared_models
COPY privacy ./privacy
COPY deploy ./deploy
RUN pip install --no-deps -e .

# Fixed UID/GID so host directories and Kubernetes fsGroup can be prepared for it.
RUN groupadd --system --gid 10001 carefl \
 && useradd --system --uid 10001 --gid carefl --home-dir /home/carefl --create-home \
            --shell /usr/sbin/nologin carefl \
 && mkdir -p /kit /state \
 && chown carefl:carefl /state
USER carefl
WORKDIR /state

VOLUME ["/kit", "/state"]
# The SuperLink's single HTTPS port (Control + Fleet + Runtime). Publish it to the admin network
# only; sites reach the Fleet API through the proxy (deploy/proxy/nginx.conf).
EXPOSE 8000

ENTRYPOINT ["carefl"]
CMD ["coordinator", "start", "--kit", "/kit", "--state-dir", "/state"]
