#!/usr/bin/env bash
# Runs one `lm run` on every host of a Cloud TPU VM slice (same command everywhere; JAX finds
# the other hosts by itself). Usage:
#   scripts/pod_run.sh TPU_NAME ZONE experiments/pretrain.py:7b gs://BUCKET/run [--config.a=b ...]
set -euo pipefail
tpu="$1"; zone="$2"; experiment="$3"; workdir="$4"; shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ~/lm && pip install -q -e '.[tpu]' &&
  lm run $experiment --workdir=$workdir --config.distributed.enabled=True $*"
