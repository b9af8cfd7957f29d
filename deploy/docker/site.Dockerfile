# carefl site: the site agent (SuperNode + carefl's site-side checks), started by `carefl site start`.
#
# Build from the repository root (the build context must be the repo, see /.dockerignore):
#   docker build -f deploy/docker/site.Dockerfile -t carefl/site:0.1.0 .
# Mounts: /kit   the site's startup kit with site.toml (read-only)
#         /state privacy ledger, preprocessing cache, installed apps (persistent, writable by UID 10001)
#         /data  the site's data (read-only)
#
# Pinned to a Debian release so a rebuild does not silently change the OS; pin the digest
# (python:3.11-slim-bookworm@sha256:...) once the image is mirrored into the hospital's registry.
FROM python:3.11-slim-bookworm

# FLWR_*: no telemetry, no update check, and no installation of an app's dependencies at run time
# (off by default on a SuperNode; set anyway so nothing can turn it on): code arriving from the
# coordinator runs only against the packages baked into this image.
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
# requirements.lock.txt pins torch==2.13.0; the CPU build of that version comes from PyTorch's CPU
# index (PyPI's Linux x86_64 wheel is the CUDA build with several GB of nvidia-* wheels).
# A site with a GPU builds the CUDA variant instead: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
# and drop --no-deps on that line (the CUDA wheel needs its nvidia-* runtime wheels), or swap the
# base for a CUDA runtime image with Python 3.11; the host needs the NVIDIA container toolkit.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY requirements.lock.txt ./
RUN pip install --no-deps --index-url "$TORCH_INDEX" "$(grep '^torch==' requirements.lock.txt)" \
 && pip install -r requirements.lock.txt

# The product itself; its dependencies are already installed exactly as locked. Installed in
# place (-e), as in the coordinator image: the tree with its pyproject.toml is the Flower App, so
# `carefl site approve /opt/carefl --config ...` yields the hash of exactly the code in this image.
COPY pyproject.toml README.md ./
COPY server ./server
COPY client ./client
COPY shared_models ./shared_models
COPY privacy ./privacy
COPY deploy ./deploy
RUN pip install --no-deps -e .

# Fixed UID/GID so host directories and Kubernetes fsGroup can be prepared for it.
# /var/lib/carefl -> /state: site.toml must keep the ledger and cache out of the read-only kit;
# written as /var/lib/carefl/... (the systemd layout) the same file works in the container.
RUN groupadd --system --gid 10001 carefl \
 && useradd --system --uid 10001 --gid carefl --home-dir /home/carefl --create-home \
            --shell /usr/sbin/nologin carefl \
 && mkdir -p /kit /state /data \
 && chown carefl:carefl /state \
 && ln -s /state /var/lib/carefl
USER carefl
WORKDIR /state

VOLUME ["/kit", "/state", "/data"]
# No EXPOSE: a site only dials out to the coordinator's proxy; nothing connects to it.

ENTRYPOINT ["carefl"]
# --log-dir: the agent's logs and Flower home go to the state volume, not beside the read-only site.toml.
CMD ["site", "start", "--kit", "/kit", "--config", "/kit/site.toml", "--log-dir", "/state/agent"]
