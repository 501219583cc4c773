# syntax=docker/dockerfile:1
# Build and runtime share the Python minor and Debian release: the binary
# links libpython from /usr/local/lib in both stages.
ARG PYTHON_VERSION=3.11
ARG DEBIAN=bookworm

FROM python:${PYTHON_VERSION}-slim-${DEBIAN} AS python

FROM rust:1.95-slim-${DEBIAN} AS build
ARG PYTHON_VERSION
COPY --from=python /usr/local /usr/local
RUN ldconfig
ENV PYO3_PYTHON=/usr/local/bin/python${PYTHON_VERSION}
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM python:${PYTHON_VERSION}-slim-${DEBIAN}
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini=0.19.* \
 && rm -rf /var/lib/apt/lists/*
# Handlers' third-party packages: a venv made by this stage's Python (the one
# the binary links), used through python.venv in config/container.toml.
COPY requirements.txt /opt/pyipcd/requirements.txt
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r /opt/pyipcd/requirements.txt
COPY --from=build /src/target/release/pyipcd /usr/local/bin/pyipcd
# Same layout as the repository, so the configs' relative paths (../python) hold.
COPY python/ /opt/pyipcd/python/
COPY config/ /opt/pyipcd/config/
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 50007
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
  CMD ["/usr/local/bin/pyipcd", "health", "--config", "/opt/pyipcd/config/container.toml"]
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/pyipcd"]
CMD ["run", "--config", "/opt/pyipcd/config/container.toml"]
