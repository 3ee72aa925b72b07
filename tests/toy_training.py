"""A small training run for the trainer's tests: the tiny model learning arithmetic sequences.

Run as a script it trains into a workdir, optionally killing itself at a chosen moment, so tests
can interrupt and resume real processes:

  python tests/toy_training.py WORKDIR STEPS [--kill-after-step N] [--kill-during-save N]
                               [--step-milliseconds N] [--outer-loop 1]

`--outer-loop 1` trains the way PPO and the self-distillation stages do: the script drives its own
loop of rollout (the current model's greedy predictions, which depend on the params) -> two
optimizer steps on halves of the rollout batch with a frozen reference model in the loss ->
checkpoint at the iteration's end, through `trainer.Session`.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  # Two processes x 4 devices, or one process x 8: the same 8-device mesh either way.
  _devices = 4 if "--process-id" in sys.argv else 8
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={_devices}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

from lm import configs, losses, model, optim, sharding, trainer

CFG = configs.get_preset("tiny")
BATCH, LENGTH = 16, 32
SCHEDULE_STEPS = 30  # fixed, so runs of different lengths share one learning-rate curve


class ArithmeticSequences:
  """Rows a, a+k, a+2k, ... (mod vocab): deterministic per batch index, resumable.

  `rows` selects this process's share of each global batch on multi-host runs.
  """

  def __init__(self, seed: int = 0, rows: tuple[int, int] = (0, BATCH)):
    self.seed, self.index, self.rows = seed, 0, rows

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.index])
    self.index += 1
    start = rng.integers(0, CFG.vocab_size, (BATCH, 1))
    stride = rng.integers(1, 4, (BATCH, 1))
    rows = (start + stride * np.arange(LENGTH + 1)) % CFG.vocab_size
    rows = rows[self.rows[0]:self.rows[1]]
    return {"tokens": rows[:, :-1].astype(np.int32), "targets": rows[:, 1:].astype(np.int32)}

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = state["index"]


def make_trainer(steps: int, grad_accum: int = 1, mesh_shape=(1, 2, 2, 2), loss_fn=None,
                 checkpoint_every: int = 10, max_nonfinite: int = 10, batch_size: int = BATCH):
  mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
  graphdef, _ = model.abstract_model(CFG)

  def next_token(params, frozen, batch, rng):
    logits, _ = model.apply(graphdef, params, batch["tokens"])
    return losses.next_token_loss(logits, batch["targets"], jnp.ones_like(batch["targets"]))

  opt_cfg = optim.OptimizerConfig(lr=3e-3, warmup_steps=5)
  cfg = trainer.TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, log_every=1,
                            checkpoint_every=checkpoint_every, max_nonfinite_in_a_row=max_nonfinite)
  return trainer.Trainer(
      loss_fn=loss_fn or next_token, optimizer=optim.make_optimizer(opt_cfg, SCHEDULE_STEPS),
      schedule=optim.learning_rate(opt_cfg, SCHEDULE_STEPS), cfg=cfg, mesh=mesh,
      param_shardings=model.param_shardings(CFG, mesh)), mesh


def train(workdir: str, steps: int, **kwargs) -> dict:
  tr, mesh = make_trainer(steps, **kwargs)
  return trainer.run(tr, params=lambda: model.create(CFG, mesh, seed=0)[1],
                     data=ArithmeticSequences(rows=tr.process_rows(BATCH)), workdir=workdir)


class Iterations:
  """The outer loop's own position: which iteration comes next."""

  def __init__(self):
    self.iteration = 0

  def get_state(self):
    return {"iteration": self.iteration}

  def set_state(self, state):
    self.iteration = state["iteration"]


def train_outer_loop(workdir: str, steps: int) -> dict:
  """Rollout -> 2 updates -> checkpoint, each iteration; the frozen reference is the initial
  model, and the loss counts only the positions the current model gets wrong."""
  graphdef, _ = model.abstract_model(CFG)
  half = BATCH // 2

  def loss_fn(params, frozen, batch, rng):
    logits, _ = model.apply(graphdef, params, batch["tokens"])
    ref_logits, _ = model.apply(graphdef, frozen, batch["tokens"])
    loss, metrics = losses.next_token_loss(logits, batch["targets"], batch["wrong"])
    drift = jnp.mean(jnp.square(logits - ref_logits))
    return loss + 1e-3 * drift, dict(metrics, drift=drift)

  tr, mesh = make_trainer(steps, loss_fn=loss_fn, checkpoint_every=4, batch_size=half)
  reference = model.create(CFG, mesh, seed=0)[1]
  predict = jax.jit(lambda p, t: jnp.argmax(model.apply(graphdef, p, t)[0], -1))
  position = Iterations()
  with trainer.Session(tr, workdir, params=lambda: model.create(CFG, mesh, seed=0)[1],
                       data=position, log=print) as session:
    while not session.finished:
      if session.preempted:
        return session.stop()
      data = ArithmeticSequences()
      data.set_state({"index": position.iteration})
      rows = next(data)
      with jax.set_mesh(mesh):
        wrong = np.asarray(predict(session.state.params, rows["tokens"])) != rows["targets"]
      rows["wrong"] = wrong.astype(np.float32)
      for start in (0, half):
        session.step({k: v[start:start + half] for k, v in rows.items()}, reference)
      position.iteration += 1
      session.maybe_checkpoint()
    return session.finish()


def main(argv):
  workdir, steps = argv[1], int(argv[2])
  options = dict(zip(argv[3::2], map(int, argv[4::2])))
  if "--process-id" in options:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{options['--port']}", num_processes=2,
                               process_id=options["--process-id"])
  if "--kill-after-step" in options:
    kill_at = options["--kill-after-step"]
    original = trainer.Trainer.step

    def step_then_maybe_die(self, state, batch, frozen=None):
      result = original(self, state, batch, frozen)
      if int(result[0].step) == kill_at:
        os.kill(os.getpid(), 9)
      return result
    trainer.Trainer.step = step_then_maybe_die
  if "--step-milliseconds" in options:  # slow steps, so a signal surely lands mid-run
    import time
    pause = options["--step-milliseconds"] / 1000
    original_step = trainer.Trainer.step

    def slow_step(self, state, batch, frozen=None):
      time.sleep(pause)
      return original_step(self, state, batch, frozen)
    trainer.Trainer.step = slow_step
  if "--kill-during-save" in options:
    from lm import checkpoints
    kill_at = options["--kill-during-save"]
    original_save = checkpoints.Manager.save

    def save_then_die(self, step, *args, **kwargs):
      result = original_save(self, step, *args, **kwargs)
      if step == kill_at:  # the asynchronous write is still in flight
        os.kill(os.getpid(), 9)
      return result
    checkpoints.Manager.save = save_then_die
  if options.get("--outer-loop"):
    print(train_outer_loop(workdir, steps))
  else:
    print(train(workdir, steps))


if __name__ == "__main__":
  main(sys.argv)
