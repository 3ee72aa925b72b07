"""`lm pod`: the exact commands of a single-slice and a multi-slice job, bad input, reruns after a
failure (a fake `gcloud` on PATH), and a 2-process CPU run through the same verb."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from lm.commands import pod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = pod.PodJob(experiment="experiments/pretrain.py:7b", workdir="gs://bucket/7b",
                 overrides=("--config.stages.pretrain.train.steps=10",), tpu="my-tpu",
                 zone="us-east5-a", repo="https://github.com/me/lm.git", ref="v1")
RUN = ("python3 -m lm.cli run experiments/pretrain.py:7b --workdir=gs://bucket/7b "
       "--config.distributed.enabled=True")
PRELOAD = "export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"


def lines(plan):
  return [str(command) for phase in plan for command in phase]


def lm(*args, env=None, timeout=120):
  env = dict(os.environ if env is None else env)
  env.pop("XLA_FLAGS", None)  # the verb's processes choose their own device counts
  return subprocess.run([sys.executable, "-m", "lm.cli", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_single_slice_commands():
  pod.check(JOB)
  assert lines(pod.tpu_plan(JOB)) == [
      "gcloud compute tpus tpu-vm ssh my-tpu --zone=us-east5-a --worker=all '--command="
      "([ -d lm/.git ] || git clone -q https://github.com/me/lm.git lm) && cd lm && "
      "git fetch -q origin v1 && git checkout -q FETCH_HEAD && "
      'python3 -m pip install -q -e ".[tpu]" && '
      f"{PRELOAD} && {RUN} --config.stages.pretrain.train.steps=10'"]


def test_multi_slice_commands_copy_the_checkout_and_span_dcn():
  job = pod.PodJob(experiment=JOB.experiment, workdir=JOB.workdir, tpu="my-qr", zone="us-east5-a",
                   project="proj", num_slices=2, install="scp", create="v5p-128")
  pod.check(job)
  assert lines(pod.tpu_plan(job)) == [
      "tar czf /tmp/lm-pod.tar.gz --exclude=.git --exclude=__pycache__ -C . .",
      "gcloud compute tpus queued-resources scp /tmp/lm-pod.tar.gz --zone=us-east5-a "
      "--project=proj my-qr:lm-pod.tar.gz --node=all --worker=all",
      "gcloud compute tpus queued-resources ssh my-qr --zone=us-east5-a --project=proj "
      "--node=all --worker=all '--command=mkdir -p lm && tar xzf lm-pod.tar.gz -C lm && cd lm && "
      f'python3 -m pip install -q -e ".[tpu]" && {PRELOAD} && {RUN} --config.mesh.dcn=2\'']
  create, state = pod.create_commands(job)
  assert str(create) == (
      "gcloud compute tpus queued-resources create my-qr --zone=us-east5-a --project=proj "
      "--accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 --node-count=2 "
      "--node-prefix=my-qr")
  assert str(state) == ("gcloud compute tpus queued-resources describe my-qr --zone=us-east5-a "
                        "--project=proj '--format=value(state.state)'")


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
  result = lm("pod", "experiments/pretrain.py:7b", "--tpu=my-tpu", "--zone=us-east5-a",
              "--workdir=gs://bucket/7b", "--repo=https://github.com/me/lm.git", "--ref=v1",
              "--config.stages.pretrain.train.steps=10", "--dry_run",
              env=dict(os.environ, PATH=str(tmp_path)))  # no gcloud to run
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.splitlines() == lines(pod.tpu_plan(JOB))
  local = lm("pod", "experiments/pretrain.py:smoke", "--workdir=/tmp/x", "--local_processes=2",
             "--port=4321", "--dry_run")
  assert local.returncode == 0, local.stderr[-2000:]
  allocator = pod.local_allocator(JOB)
  preload = f" LD_PRELOAD={allocator}" if allocator else ""
  assert local.stdout.splitlines() == [
      f"JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4{preload} "
      f"{sys.executable} -m lm.cli run experiments/pretrain.py:smoke --workdir=/tmp/x "
      "--config.distributed.enabled=True --config.distributed.coordinator=localhost:4321 "
      f"--config.distributed.num_processes=2 --config.distributed.process_id={i}"
      for i in range(2)]


@pytest.mark.parametrize("change, message", [
    (dict(workdir="/tmp/run"), "--workdir=/tmp/run is not a gs:// bucket path"),
    (dict(tpu=""), "--tpu=NAME and --zone=ZONE are required"),
    (dict(repo=""), "--install=git needs --repo=URL"),
    (dict(install="rsync"), "--install=rsync: choose one of"),
    (dict(num_slices=0), "--num_slices must be >= 1"),
    (dict(num_slices=2, overrides=("--config.mesh.dcn=4",)),
     "--config.mesh.dcn=4 disagrees with --num_slices=2"),
    (dict(experiment="/home/me/lm/experiments/pretrain.py:7b"), "relative to the repository root"),
])
def test_bad_jobs_are_refused_with_the_reason(change, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    pod.check(dataclasses.replace(JOB, **change))


def test_bad_command_lines_fail_before_any_host_is_touched():
  result = lm("pod", "experiments/pretrain.py:7b", "--tpu=t", "--zone=z", "--workdir=/tmp/run",
              "--repo=r")
  assert result.returncode != 0 and "not a gs:// bucket path" in result.stderr
  typo = lm("pod", "experiments/pretrain.py:7b", "--tpu=t", "--zone=z", "--workdir=gs://b/r",
            "--repo=r", "--config.stages.pretrain.trian.steps=3")
  assert typo.returncode != 0 and "did you mean 'train'" in typo.stderr


def fake_gcloud(directory, succeed_from: int):
  """A `gcloud` that logs its arguments and fails until its `succeed_from`-th call."""
  directory.mkdir()
  script = directory / "gcloud"
  script.write_text("#!/bin/sh\n"
                    'printf "%s\\n" "$*" >> "$GCLOUD_LOG"\n'
                    f'[ "$(wc -l < "$GCLOUD_LOG")" -ge {succeed_from} ]\n')
  script.chmod(0o755)
  return dict(os.environ, PATH=f"{directory}:{os.environ['PATH']}",
              GCLOUD_LOG=str(directory / "log"))


def test_a_failed_attempt_is_rerun_with_the_same_command(tmp_path):
  env = fake_gcloud(tmp_path / "bin", succeed_from=2)
  result = lm("pod", "experiments/pretrain.py:7b", "--tpu=my-tpu", "--zone=us-east5-a",
              "--workdir=gs://bucket/7b", "--repo=https://github.com/me/lm.git", "--ref=v1",
              "--config.stages.pretrain.train.steps=10", "--retry_wait=0", env=env)
  assert result.returncode == 0, result.stderr[-2000:]
  calls = (tmp_path / "bin" / "log").read_text().splitlines()
  expected = " ".join(pod.tpu_plan(JOB)[0][0].argv[1:])
  assert calls == [expected, expected]
  assert "attempt 1 failed (exit 1); rerunning" in result.stderr


def test_retries_run_out(tmp_path, monkeypatch):
  env = fake_gcloud(tmp_path / "bin", succeed_from=99)
  monkeypatch.setenv("PATH", env["PATH"])
  monkeypatch.setenv("GCLOUD_LOG", env["GCLOUD_LOG"])
  messages = []
  assert pod.run_with_retries(pod.tpu_plan(JOB), retries=2, wait=0, log=messages.append) == 1
  assert len((tmp_path / "bin" / "log").read_text().splitlines()) == 3
  assert messages[-1] == "lm pod: 3 attempts failed (last exit 1); giving up"


def test_two_local_processes_run_the_experiment(tmp_path):
  args = ("pod", "experiments/pretrain.py:smoke", f"--workdir={tmp_path}", "--local_processes=2",
          "--local_devices=2", "--retries=0", "--config.stages.pretrain.train.steps=2",
          "--config.stages.pretrain.train.checkpoint_every=2",
          "--config.stages.pretrain.train.log_every=1",
          "--config.stages.pretrain.optimizer.warmup_steps=1",
          "--config.stages.pretrain.data.eval_batches=1")
  result = lm(*args, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads((tmp_path / "pretrain" / "metrics.json").read_text())
  assert metrics["loss"] > 0
  assert json.loads((tmp_path / "config.json").read_text())["distributed"]["num_processes"] == 2
  assert result.stdout.count("[pretrain] done") == 2  # both processes ran the stage
