#!/usr/bin/env bash
# Runs one `lm run` on every host of a Cloud TPU VM slice: a thin wrapper over `lm pod`, which
# also installs the code, preloads tcmalloc, reruns after a preemption and has --dry_run. Usage:
#   scripts/pod_run.sh TPU_NAME ZONE experiments/pretrain.py:7b gs://BUCKET/run \
#       --repo=https://github.com/ME/lm.git [--ref=main | --install=scp] [--config.a=b ...]
set -euo pipefail
if [ "$#" -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE EXPERIMENT.py:PRESET gs://BUCKET/RUN [lm pod flags]" >&2
  exit 2
fi
tpu="$1"; zone="$2"; experiment="$3"; workdir="$4"; shift 4
exec lm pod "$experiment" --tpu="$tpu" --zone="$zone" --workdir="$workdir" "$@"
