#!/usr/bin/env bash
# Build and install horovod 0.28.1 (the last release) for the installed TensorFlow, CPU-only with
# gloo. A plain `pip install horovod==0.28.1` fails against TF >= 2.19 (facts in docs/distributed.md):
#   1. TF's headers need highwayhash and farmhash headers  -> Debian libhighwayhash-dev, libfarmhash-dev
#   2. horovod/tensorflow/xla_mpi_ops.cc includes a header TF no longer ships; that file only holds
#      XLA lowerings of the collectives, so it is dropped from the build (upstream PR horovod#4302).
# Idempotent: does nothing when a horovod that imports with TensorFlow support is already there.
# KERAS_HOOPT_SKIP_HOROVOD=1 skips it (the package then works without `communication="horovod"`).
set -euo pipefail

if [[ "${KERAS_HOOPT_SKIP_HOROVOD:-0}" == "1" ]]; then
  echo "install_horovod: skipped (KERAS_HOOPT_SKIP_HOROVOD=1)"; exit 0
fi
PYTHON="${PYTHON:-python}"
if "$PYTHON" -c "import horovod.tensorflow as h; assert h.gloo_built()" >/dev/null 2>&1; then
  echo "install_horovod: horovod with TensorFlow and gloo already installed"; exit 0
fi
"$PYTHON" -c "import tensorflow" || { echo "install_horovod: install TensorFlow first" >&2; exit 1; }

for header in /usr/include/highwayhash/arch_specific.h /usr/include/farmhash.h; do
  if [[ ! -f "$header" ]]; then
    if command -v apt-get >/dev/null; then
      SUDO=""; [[ "$(id -u)" != "0" ]] && SUDO="sudo"
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libhighwayhash-dev libfarmhash-dev
      break
    fi
    echo "install_horovod: $header missing; install libhighwayhash-dev and libfarmhash-dev" >&2; exit 1
  fi
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m pip download --no-deps --no-binary :all: horovod==0.28.1 -d "$work" -q
tar -xzf "$work"/horovod-0.28.1.tar.gz -C "$work"
src="$work/horovod-0.28.1"
sed -i '/xla_mpi_ops.cc/d' "$src/horovod/tensorflow/CMakeLists.txt"
grep -q xla_mpi_ops "$src/horovod/tensorflow/CMakeLists.txt" && { echo "install_horovod: patch failed" >&2; exit 1; }

echo "install_horovod: building horovod 0.28.1 (about 8 minutes on 2 cores)"
HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=gloo \
MAKEFLAGS="-j$(nproc)" \
  "$PYTHON" -m pip install --no-build-isolation -q "$src"
"$PYTHON" -c "import horovod.tensorflow as h; assert h.gloo_built(); print('install_horovod: ok')"
