"""`lm pod EXPERIMENT --workdir=gs://... --tpu=NAME --zone=Z`: one `lm run` on every TPU host.

  lm pod experiments/pretrain.py:7b --tpu=my-v5p --zone=us-east5-a --workdir=gs://B/7b \
      --repo=https://github.com/me/lm.git --ref=main --dry_run
  lm pod experiments/pretrain.py:7b --tpu=my-qr --zone=us-east5-a --num_slices=2 \
      --workdir=gs://B/7b --install=scp --create=v5p-128          # multi-slice, queued resource
  lm pod experiments/pretrain.py:smoke --workdir=/tmp/pod --local_processes=2   # CPU, localhost

Every host gets the same command (`gcloud compute tpus tpu-vm ssh --worker=all`, or
`queued-resources ssh --node=all --worker=all` across slices): install the code (git clone/fetch
of --repo at --ref, or a tarball of this checkout copied with scp, then `pip install -e .[tpu]`),
preload tcmalloc (TPU VM images ship it; glibc malloc costs XLA page faults, lm/hardware.py),
then `lm run EXPERIMENT --workdir=... --config.distributed.enabled=True [--config.a=b ...]`; JAX
finds its peers, and across slices the `dcn` mesh axis (`--config.mesh.dcn=NUM_SLICES`, added
here) from the slices' metadata. A failed attempt (a preempted host, a dropped ssh) is rerun
whole up to --retries times: `lm run` skips finished stages and resumes from checkpoints, so a
rerun continues where the run stopped. `--dry_run` prints the commands instead of running them.

`--local_processes=N` runs the same `lm run` as N processes on this machine (CPU devices, a
coordinator on localhost): the multi-host path, testable without a pod.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import socket
import subprocess
import sys
import time

from absl import flags

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"
# What a laptop or CI machine may have instead (Debian's libtcmalloc-minimal4, libjemalloc2).
LOCAL_ALLOCATORS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
ARCHIVE = "lm-pod.tar.gz"
INSTALLS = ("git", "scp", "none")

TPU = flags.DEFINE_string("tpu", None, "TPU VM name (with --num_slices > 1: queued resource).")
ZONE = flags.DEFINE_string("zone", None, "The TPU's zone.")
PROJECT = flags.DEFINE_string("project", None, "Google Cloud project (default: gcloud's).")
WORKDIR = flags.DEFINE_string("workdir", None, "The run directory; gs://... for TPU hosts.")
NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices; >1 runs over the `dcn` mesh axis.")
INSTALL = flags.DEFINE_enum("install", "git", INSTALLS,
                            "git: clone/fetch --repo at --ref; scp: copy this checkout; none.")
REPO = flags.DEFINE_string("repo", None, "Git URL the hosts clone (--install=git).")
REF = flags.DEFINE_string("ref", "main", "Branch, tag or commit the hosts check out.")
SOURCE = flags.DEFINE_string("source", ".", "The checkout --install=scp copies.")
REMOTE_DIR = flags.DEFINE_string("remote_dir", "lm", "The code's directory on each host.")
ALLOCATOR = flags.DEFINE_string("allocator", TCMALLOC, "Preloaded on each host ('' for none).")
CREATE = flags.DEFINE_string("create", None,
                             "Create the slice(s) first as a queued resource of this "
                             "accelerator type (e.g. v5p-128) and wait until it is ACTIVE.")
RUNTIME = flags.DEFINE_string("runtime_version", "v2-alpha-tpuv5", "TPU software for --create.")
RETRIES = flags.DEFINE_integer("retries", 3, "Reruns after a failed attempt (preemption).")
RETRY_WAIT = flags.DEFINE_float("retry_wait", 60.0, "Seconds between attempts.")
DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")
LOCAL = flags.DEFINE_integer("local_processes", 0,
                             "Run N processes on this machine instead of a TPU (CPU, tests).")
LOCAL_DEVICES = flags.DEFINE_integer("local_devices", 4, "CPU devices per local process.")
PORT = flags.DEFINE_integer("port", 0, "Local coordinator port (0: a free one).")

# The experiment and its --config.* overrides, taken from the command line before absl parses it
# (they are passed through to `lm run` verbatim).
_RUN_ARGS: list[str] = []


@dataclasses.dataclass(frozen=True)
class Command:
  """One process to start: argv, with environment variables added to this process's."""

  argv: tuple[str, ...]
  env: tuple[tuple[str, str], ...] = ()

  def __str__(self) -> str:
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in self.env] + [shlex.join(self.argv)])


# An attempt is a list of phases run in order; the commands of a phase run at once.
Plan = list[list[Command]]


@dataclasses.dataclass(frozen=True)
class PodJob:
  """What `lm pod` runs; see the module docstring and the flags for the fields."""

  experiment: str
  workdir: str
  overrides: tuple[str, ...] = ()
  tpu: str = ""
  zone: str = ""
  project: str = ""
  num_slices: int = 1
  install: str = "git"
  repo: str = ""
  ref: str = "main"
  source: str = "."
  remote_dir: str = "lm"
  allocator: str = TCMALLOC
  create: str = ""
  runtime_version: str = "v2-alpha-tpuv5"


def check(job: PodJob) -> None:
  """Raises ValueError naming the flag and the reason for a job that cannot run on TPU hosts."""
  if not job.tpu or not job.zone:
    raise ValueError("--tpu=NAME and --zone=ZONE are required (or --local_processes=N)")
  if not job.workdir.startswith("gs://"):
    raise ValueError(f"--workdir={job.workdir} is not a gs:// bucket path: every host must read "
                     "and write the same run directory, and a host's disk goes with a preempted "
                     "VM; use --workdir=gs://BUCKET/RUN")
  if os.path.isabs(job.experiment):
    raise ValueError(f"experiment {job.experiment}: give it relative to the repository root "
                     "(experiments/NAME.py:PRESET); the hosts run it from their checkout")
  if job.num_slices < 1:
    raise ValueError(f"--num_slices must be >= 1, got {job.num_slices}")
  if job.install not in INSTALLS:
    raise ValueError(f"--install={job.install}: choose one of {INSTALLS}")
  if job.install == "git" and not job.repo:
    raise ValueError("--install=git needs --repo=URL (or --install=scp to copy this checkout)")
  dcn = [o.split("=", 1)[1] for o in job.overrides if o.startswith("--config.mesh.dcn=")]
  if dcn and dcn[-1] != str(job.num_slices):
    raise ValueError(f"--config.mesh.dcn={dcn[-1]} disagrees with --num_slices={job.num_slices}: "
                     "the dcn axis spans the slices")


def run_args(job: PodJob) -> list[str]:
  """`lm run`'s arguments on every host: the multi-host switch, and dcn across slices."""
  args = [job.experiment, f"--workdir={job.workdir}", "--config.distributed.enabled=True"]
  if job.num_slices > 1 and not any(o.startswith("--config.mesh.dcn=") for o in job.overrides):
    args.append(f"--config.mesh.dcn={job.num_slices}")
  return args + list(job.overrides)


def remote_command(job: PodJob) -> str:
  """The shell command every host runs: install, allocator, `lm run`."""
  where = shlex.quote(job.remote_dir)
  if job.install == "git":
    steps = [f"([ -d {where}/.git ] || git clone -q {shlex.quote(job.repo)} {where})",
             f"cd {where}", f"git fetch -q origin {shlex.quote(job.ref)}",
             "git checkout -q FETCH_HEAD"]
  elif job.install == "scp":
    steps = [f"mkdir -p {where}", f"tar xzf {ARCHIVE} -C {where}", f"cd {where}"]
  else:
    steps = [f"cd {where}"]
  if job.install != "none":
    steps.append('python3 -m pip install -q -e ".[tpu]"')
  if job.allocator:
    steps.append(f"export LD_PRELOAD={shlex.quote(job.allocator)}")
  steps.append(shlex.join(["python3", "-m", "lm.cli", "run"] + run_args(job)))
  return " && ".join(steps)


def _gcloud(job: PodJob, group: tuple[str, ...], verb: str, name: str, *rest: str) -> Command:
  """`gcloud compute tpus GROUP VERB NAME --zone=Z [--project=P] REST...`."""
  project = (f"--project={job.project}",) if job.project else ()
  return Command(("gcloud", "compute", "tpus", *group, verb, name, f"--zone={job.zone}",
                  *project, *rest))


def _hosts(job: PodJob) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """gcloud's selection of every host: all workers of a slice, or of all slices' nodes."""
  if job.num_slices > 1:
    return ("queued-resources",), ("--node=all", "--worker=all")
  return ("tpu-vm",), ("--worker=all",)


def tpu_plan(job: PodJob) -> Plan:
  """The commands of one attempt on TPU hosts (`check` first)."""
  group, selection = _hosts(job)
  plan: Plan = []
  if job.install == "scp":
    archive = os.path.join("/tmp", ARCHIVE)
    plan.append([Command(("tar", "czf", archive, "--exclude=.git", "--exclude=__pycache__",
                          "-C", job.source, "."))])
    copy = _gcloud(job, group, "scp", archive, f"{job.tpu}:{ARCHIVE}", *selection)
    plan.append([copy])
  plan.append([_gcloud(job, group, "ssh", job.tpu, *selection,
                       f"--command={remote_command(job)}")])
  return plan


def create_commands(job: PodJob) -> tuple[Command, Command]:
  """(create the queued resource, print its state) for --create."""
  if job.num_slices > 1:
    nodes = (f"--node-count={job.num_slices}", f"--node-prefix={job.tpu}")
  else:
    nodes = (f"--node-id={job.tpu}",)
  group = ("queued-resources",)
  create = _gcloud(job, group, "create", job.tpu, f"--accelerator-type={job.create}",
                   f"--runtime-version={job.runtime_version}", *nodes)
  state = _gcloud(job, group, "describe", job.tpu, "--format=value(state.state)")
  return create, state


def local_allocator(job: PodJob) -> str | None:
  """The first of --allocator and the usual Debian ones that exists here, or None."""
  return next((path for path in (job.allocator,) + LOCAL_ALLOCATORS
               if path and os.path.exists(path)), None)


def local_plan(job: PodJob, processes: int, devices: int, port: int) -> Plan:
  """N processes of the same `lm run` on this machine, over a coordinator on localhost, under a
  fast allocator when there is one."""
  env = (("JAX_PLATFORMS", "cpu"),
         ("XLA_FLAGS", f"--xla_force_host_platform_device_count={devices}"))
  allocator = local_allocator(job)
  if allocator:
    env += (("LD_PRELOAD", allocator),)
  args = run_args(dataclasses.replace(job, num_slices=1))
  return [[Command((sys.executable, "-m", "lm.cli", "run", *args,
                    f"--config.distributed.coordinator=localhost:{port}",
                    f"--config.distributed.num_processes={processes}",
                    f"--config.distributed.process_id={i}"), env)
           for i in range(processes)]]


def run_phase(commands: list[Command]) -> int:
  """Starts the commands together; 0 when all succeed. On the first failure the others are
  stopped (they would wait for their peer forever)."""
  procs = [subprocess.Popen(list(c.argv), env=dict(os.environ, **dict(c.env)))
           for c in commands]
  code = 0
  try:
    pending = list(procs)
    while pending:
      for p in list(pending):
        if p.poll() is None:
          continue
        pending.remove(p)
        if p.returncode != 0 and code == 0:
          code = p.returncode
          for other in pending:
            other.terminate()
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return code


def run_with_retries(plan: Plan, retries: int, wait: float, log=print) -> int:
  """Runs the plan until an attempt succeeds or `retries` reruns have failed; the exit code."""
  for attempt in range(retries + 1):
    code = 0
    for phase in plan:
      code = run_phase(phase)
      if code:
        break
    if code == 0:
      return 0
    if attempt < retries:
      log(f"lm pod: attempt {attempt + 1} failed (exit {code}); rerunning in {wait:g}s "
          f"(the run resumes from its checkpoints)")
      time.sleep(wait)
  log(f"lm pod: {retries + 1} attempts failed (last exit {code}); giving up")
  return code


def wait_active(state: Command, timeout: float = 24 * 3600, every: float = 60.0) -> None:
  """Polls the queued resource until ACTIVE; FAILED or SUSPENDED is an error."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    out = subprocess.run(list(state.argv), capture_output=True, text=True).stdout.strip()
    if out == "ACTIVE":
      return
    if out in ("FAILED", "SUSPENDED"):
      raise ValueError(f"queued resource is {out}")
    print(f"lm pod: queued resource is {out or 'not ready'}; waiting", file=sys.stderr)
    time.sleep(every)
  raise ValueError("queued resource did not become ACTIVE in time")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def prepare_argv(argv: list[str]) -> list[str]:
  """Takes the experiment (first positional) and --config.* overrides out of absl's way, checking
  the overrides against the experiment here, before any host is touched."""
  from lm.commands import _experiment
  argv = _experiment.positional_config(argv)
  experiment = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  if experiment:
    _experiment.validate_overrides([argv[0], f"--config={experiment[-1]}"] + overrides)
  rest = [a for a in argv[1:] if not a.startswith(("--config=", "--config."))]
  _RUN_ARGS[:] = experiment[-1:] + overrides
  return [argv[0]] + rest


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"lm pod: unexpected arguments {argv[1:]}")
  if not _RUN_ARGS or WORKDIR.value is None:
    raise SystemExit("usage: lm pod EXPERIMENT.py:PRESET --workdir=gs://B/RUN --tpu=NAME "
                     "--zone=ZONE [--repo=URL --ref=REF | --install=scp] [--num_slices=N] "
                     "[--dry_run] [--config.a=b ...]\n"
                     "   or: lm pod EXPERIMENT.py:PRESET --workdir=DIR --local_processes=N")
  job = PodJob(experiment=_RUN_ARGS[0], workdir=WORKDIR.value, overrides=tuple(_RUN_ARGS[1:]),
               tpu=TPU.value or "", zone=ZONE.value or "", project=PROJECT.value or "",
               num_slices=NUM_SLICES.value, install=INSTALL.value, repo=REPO.value or "",
               ref=REF.value, source=SOURCE.value, remote_dir=REMOTE_DIR.value,
               allocator=ALLOCATOR.value, create=CREATE.value or "",
               runtime_version=RUNTIME.value)
  try:
    if LOCAL.value:
      if LOCAL.value < 1 or TPU.value or CREATE.value:
        raise ValueError("--local_processes=N (N >= 1) runs on this machine: drop --tpu/--create")
      plan = local_plan(job, LOCAL.value, LOCAL_DEVICES.value, PORT.value or _free_port())
      create = None
    else:
      check(job)
      plan = tpu_plan(job)
      create = create_commands(job) if job.create else None
  except ValueError as e:
    raise SystemExit(f"lm pod: {e}")
  if DRY_RUN.value:
    if create:
      print(create[0])
      print(f"{create[1]}   # repeated until it prints ACTIVE")
    for phase in plan:
      for command in phase:
        print(command)
    return
  if create:
    subprocess.run(list(create[0].argv), check=True)
    try:
      wait_active(create[1])
    except ValueError as e:
      raise SystemExit(f"lm pod: {e}")
  code = run_with_retries(plan, RETRIES.value, RETRY_WAIT.value,
                          log=lambda text: print(text, file=sys.stderr))
  if code:
    sys.exit(code)
