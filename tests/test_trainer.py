"""The trainer: accumulation, non-finite skips, schedules, and exact resume after any interruption."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm import metrics_io, model, optim, trainer

sys.path.insert(0, os.path.dirname(__file__))
import toy_training  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "toy_training.py")


def one_step(grad_accum: int):
  tr, mesh = toy_training.make_trainer(steps=10, grad_accum=grad_accum)
  state = tr.init_state(model.create(toy_training.CFG, mesh, seed=0)[1])
  state, metrics = tr.step(state, next(toy_training.ArithmeticSequences()))
  return jax.device_get(state.params), jax.device_get(metrics)


def test_gradient_accumulation_equals_one_large_batch():
  params1, metrics1 = one_step(grad_accum=1)
  params4, metrics4 = one_step(grad_accum=4)
  np.testing.assert_allclose(metrics4["loss"], metrics1["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics4["grad_norm"], metrics1["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params4, params1)


def test_non_finite_updates_are_skipped_counted_and_abort_after_n(tmp_path):
  graphdef, _ = model.abstract_model(toy_training.CFG)

  def poisoned(params, frozen, batch, rng):
    logits, _ = model.apply(graphdef, params, batch["tokens"])
    loss = jnp.mean(logits) * jnp.nan
    return loss, {"loss": loss, "weight": jnp.float32(1.0)}

  tr, mesh = toy_training.make_trainer(steps=10, loss_fn=poisoned, max_nonfinite=3)
  params = model.create(toy_training.CFG, mesh, seed=0)[1]
  before = jax.device_get(params)
  state = tr.init_state(params)
  state, metrics = tr.step(state, next(toy_training.ArithmeticSequences()))
  assert float(metrics["finite"]) == 0.0 and int(state.nonfinite_total) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
  with pytest.raises(trainer.NonFiniteLossError, match="3 steps in a row"):
    trainer.run(tr, params=params, data=toy_training.ArithmeticSequences(),
                workdir=str(tmp_path), log=lambda s: None)


def test_logged_learning_rate_is_the_one_applied_after_a_skipped_step():
  """A skipped (non-finite) step does not advance optax's schedule count; the logged rate must
  follow optax's count, not the step counter, or it drifts one step per skip."""
  graphdef, _ = model.abstract_model(toy_training.CFG)

  def sometimes_poisoned(params, frozen, batch, rng):
    logits, _ = model.apply(graphdef, params, batch["tokens"])
    loss, metrics = toy_training.losses.next_token_loss(
        logits, batch["targets"], jnp.ones_like(batch["targets"]))
    return loss * batch["scale"][0, 0], metrics

  tr, mesh = toy_training.make_trainer(steps=10)
  tr2 = trainer.Trainer(loss_fn=sometimes_poisoned, optimizer=tr.optimizer, schedule=tr.schedule,
                        cfg=tr.cfg, mesh=mesh, param_shardings=tr.param_shardings)
  state = tr2.init_state(model.create(toy_training.CFG, mesh, seed=0)[1])
  data = toy_training.ArithmeticSequences()
  rates = []
  for scale in (1.0, np.nan, 1.0, 1.0):
    batch = dict(next(data), scale=np.full((toy_training.BATCH, 1), scale, np.float32))
    state, metrics = tr2.step(state, batch)
    rates.append(float(metrics["learning_rate"]))
  # optax's count: 0, 1, (skipped: still 1), 1, 2.
  expected = [float(tr.schedule(c)) for c in (0, 1, 1, 2)]
  np.testing.assert_allclose(rates, expected, rtol=1e-6)
  assert int(state.step) == 4 and int(state.nonfinite_total) == 1


def test_schedule_warmup_then_cosine_to_ten_percent():
  cfg = optim.OptimizerConfig(lr=3e-4, warmup_steps=2000)
  schedule = optim.learning_rate(cfg, 10_000)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(1000)), 1.5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(2000)), 3e-4, rtol=1e-6)
  # Halfway through the decay, cosine is at the midpoint between peak and floor.
  np.testing.assert_allclose(float(schedule(6000)), 3e-5 + (3e-4 - 3e-5) / 2, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(10_000)), 3e-5, rtol=1e-6)
  rm = optim.OptimizerConfig(lr=1e-5, warmup_steps=5, warmup_fraction=0.03)
  assert optim.warmup_steps(rm, 100) == 5 and optim.warmup_steps(rm, 1000) == 30


def test_adamw_matches_optax_reference():
  cfg = optim.OptimizerConfig(lr=1e-3, schedule="constant", warmup_steps=0, grad_clip=0.0)
  ours = optim.make_optimizer(cfg, 100)
  reference = optax.adamw(1e-3, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1)
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  grads = {"w": jnp.ones((2, 3)) * 0.3}
  u1, _ = ours.update(grads, ours.init(params), params)
  u2, _ = reference.update(grads, reference.init(params), params)
  np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6)


def test_gradients_are_clipped_to_global_norm_one_before_adamw():
  """LLAMA2.md §3.2: clip 1.0. Adam's first update hides a clip (it divides by |g|), so two steps
  with a huge then a small gradient: the moments remember the clipped size."""
  cfg = optim.OptimizerConfig(lr=1e-2, schedule="constant", warmup_steps=0)
  assert cfg.grad_clip == 1.0
  ours = optim.make_optimizer(cfg, 100)
  reference = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1))
  unclipped = optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1)
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  grads = [{"w": jnp.full((2, 3), 40.0)}, {"w": jnp.full((2, 3), -0.2)}]  # norms 98, 0.49

  def second_update(tx):
    state = tx.init(params)
    for g in grads:
      update, state = tx.update(g, state, params)
    return update["w"]

  np.testing.assert_allclose(second_update(ours), second_update(reference), rtol=1e-6)
  assert not np.allclose(second_update(ours), second_update(unclipped), rtol=1e-2)


def test_weight_decay_can_exempt_norm_gains():
  cfg = optim.OptimizerConfig(lr=1.0, schedule="constant", warmup_steps=0, grad_clip=0.0,
                              weight_decay_on="matrices")
  tx = optim.make_optimizer(cfg, 10)
  params = {"norm": {"weight": jnp.ones(3)}, "output": jnp.ones((3, 2))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(jnp.abs(updates["norm"]["weight"]).max()) == 0.0
  assert float(jnp.abs(updates["output"]).max()) > 0.0


def run_script(workdir, steps, *extra, expect_kill=False):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, SCRIPT, str(workdir), str(steps), *map(str, extra)],
                          capture_output=True, text=True, env=env, timeout=600)
  if expect_kill:
    assert result.returncode == -9, result.stderr[-2000:]
  else:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def losses_of(workdir):
  return [(r["step"], r["loss"]) for r in metrics_io.read_rows(str(workdir), "train")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  run_script(workdir, 30)
  curve = losses_of(workdir)
  assert len(curve) == 30 and curve[-1][1] < 0.75 * curve[0][1]  # it learns (5.5 -> 3.8 here)
  return curve


def test_sigkill_anywhere_then_resume_gives_the_same_loss_curve(tmp_path, uninterrupted):
  run_script(tmp_path, 30, "--kill-after-step", 7, expect_kill=True)   # before any checkpoint
  run_script(tmp_path, 30, "--kill-after-step", 16, expect_kill=True)  # between checkpoints
  run_script(tmp_path, 30, "--kill-during-save", 20, expect_kill=True)  # mid-save
  run_script(tmp_path, 30)
  assert losses_of(tmp_path) == uninterrupted


def test_a_stage_driving_its_own_loop_resumes_exactly_after_sigkill(tmp_path_factory):
  """Rollout -> two updates with a frozen model in the loss -> checkpoint, as PPO runs: killed
  mid-iteration and mid-save, the resumed run draws the uninterrupted curve."""
  whole = tmp_path_factory.mktemp("outer_whole")
  run_script(whole, 12, "--outer-loop", 1)
  curve = losses_of(whole)
  assert [s for s, _ in curve] == list(range(1, 13))
  resumed = tmp_path_factory.mktemp("outer_resumed")
  run_script(resumed, 12, "--outer-loop", 1, "--kill-after-step", 5, expect_kill=True)
  run_script(resumed, 12, "--outer-loop", 1, "--kill-during-save", 8, expect_kill=True)
  run_script(resumed, 12, "--outer-loop", 1)
  assert losses_of(resumed) == curve


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, uninterrupted):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  process = subprocess.Popen([sys.executable, SCRIPT, str(tmp_path), "30",
                              "--step-milliseconds", "200"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and len(losses_of(tmp_path)) < 12:
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  out, err = process.communicate(timeout=300)
  assert process.returncode == 0, err[-2000:]
  assert "SIGTERM: saved step" in out
  stopped = int(out.split("SIGTERM: saved step ")[1].split()[0])
  assert stopped in [s for s in map(int, os.listdir(tmp_path / "checkpoints")) if s]
  assert stopped < 30
  run_script(tmp_path, 30)
  assert losses_of(tmp_path) == uninterrupted


def test_corrupted_newest_checkpoint_falls_back_to_the_previous(tmp_path, uninterrupted):
  run_script(tmp_path, 30, "--kill-after-step", 25, expect_kill=True)
  newest = tmp_path / "checkpoints" / "20"
  for root, _, files in os.walk(newest / "params"):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(3)
  result = run_script(tmp_path, 30)
  assert "checkpoint step 20 could not be restored" in result.stdout
  assert "resumed from step 10" in result.stdout
  assert losses_of(tmp_path) == uninterrupted


def test_unwritable_workdir_fails_before_any_compute(tmp_path):
  blocker = tmp_path / "a-file"
  blocker.write_text("")
  calls = []
  tr, mesh = toy_training.make_trainer(steps=5, loss_fn=lambda *a: calls.append(1))
  with pytest.raises(PermissionError, match="not writable"):
    trainer.run(tr, params=lambda: calls.append("init"), data=toy_training.ArithmeticSequences(),
                workdir=str(blocker / "run"))
  assert calls == []


def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path, uninterrupted):
  import portpicker
  port = portpicker.pick_unused_port()
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  workers = [subprocess.Popen(
      [sys.executable, SCRIPT, str(tmp_path), "12", "--process-id", str(i), "--port", str(port)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for worker in workers:
    _, err = worker.communicate(timeout=600)
    assert worker.returncode == 0, err[-3000:]
  curve = losses_of(tmp_path)
  assert [s for s, _ in curve] == list(range(1, 13))
  # Cross-process (gloo) reductions may sum in another order than in-process ones: fp32 rounding.
  np.testing.assert_allclose([l for _, l in curve], [l for _, l in uninterrupted[:12]], rtol=2e-5)
