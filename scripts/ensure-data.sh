#!/usr/bin/env bash
# Installs the Debian data package attar's built-in Fashion-MNIST comes from, if it is missing.
set -euo pipefail
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ -f "$FMNIST" ]; then exit 0; fi
CMD="apt-get update && apt-get install -y dataset-fashion-mnist"
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  echo "Fashion-MNIST is missing: running '$CMD'"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
  echo "Fashion-MNIST is missing. Install it with: sudo $CMD" >&2
  exit 1
fi
