#!/bin/sh
# The accelerator throughput table in one command (see bench/gpu.py): TensorFlow if installed, else Keras on JAX.
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu.py" "$@"
