# syntax=docker/dockerfile:1
# Magpie's image. CPU PyTorch by default; a CUDA build with `--build-arg TORCH_VARIANT=cu128` (any variant PyTorch's
# wheel index has, matching the host's driver) and `docker run --gpus all`. What was and was not verified: README.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# A font with Hangul for the dashboard's Korean plots (Debian's NanumGothic; matplotlib finds it by itself).
RUN apt-get update \
    && apt-get install -y --no-install-recommends "fonts-nanum=20200506-*" \
    && rm -rf /var/lib/apt/lists/*

# torch first, from PyTorch's own wheel index for the variant, so pip never pulls the multi-GB CUDA build by accident.
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN python -m pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"

# Its dependencies exactly as locked, every file checked against its hash (requirements.lock, written by `make lock`).
COPY requirements.lock /src/
RUN python -m pip install --require-hashes --no-deps -r /src/requirements.lock

# Magpie itself, installed as a package (the migrations travel inside it) with nothing more downloaded: no
# dependencies, no build environment (the lock pinned setuptools); `pip check` proves the set complete. The source
# tree is not kept.
COPY pyproject.toml README.md /src/
COPY core /src/core
COPY bot /src/bot
COPY trainer /src/trainer
COPY alembic /src/alembic
RUN python -m pip install --no-deps --no-build-isolation /src && python -m pip check && rm -rf /src

# A non-root user owns the two volumes: /data (SQLite database, exports, the Hugging Face cache), /models (versions).
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/magpie magpie \
    && mkdir -p /data /models \
    && chown magpie:magpie /data /models
COPY --chmod=0755 deploy/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
# CONSOLE=off: a container's stdin is closed, so with no platform token yet Magpie serves /healthz and the dashboard
# instead of opening a console that would stop at once (`docker run -it -e CONSOLE=auto …` chats in the terminal).
# Inside the container's own network the servers listen on every address: what reaches them is what `docker run -p`
# publishes (publish a webhook's port to 127.0.0.1 only, for the TLS proxy in front of it: docs/security.md).
ENV DATABASE_URL=sqlite+aiosqlite:////data/magpie.db \
    MODELS_DIR=/models \
    HF_HOME=/data/huggingface \
    HTTP_LISTEN=0.0.0.0:8080 \
    CONSOLE=off \
    TELEGRAM_WEBHOOK_LISTEN=0.0.0.0
VOLUME ["/data", "/models"]
WORKDIR /data
USER 10001:10001
EXPOSE 8080

# Healthy = /healthz answers 200 (database, engine, platforms). The first start may build the offline starter
# (STARTER_BUDGET_MINUTES, default 5) or download BASE_MODEL, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

# `magpie db upgrade`, then `magpie run` (the default command); any other magpie command runs as given.
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["run"]
