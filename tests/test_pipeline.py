"""`lm run` end to end on the smoke preset: stages, outputs, report, resume, overrides, eval."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(__file__))


def lm(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
  return subprocess.run([sys.executable, "-m", "lm.cli", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("smoke")
  result = lm("run", "experiments/pretrain.py:smoke", f"--workdir={workdir}",
              )
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def test_run_writes_model_metrics_report_and_curve(smoke_run):
  workdir, result = smoke_run
  stage = workdir / "pretrain"
  metrics = json.loads((stage / "metrics.json").read_text())
  # Arithmetic rows are learnable: from ~5.5 nats (uniform over 256) to well under 3.
  assert metrics["loss"] < 3.0 and metrics["perplexity"] < 20
  assert json.loads((stage / "model.json").read_text())["head"] == "lm"
  assert (stage / "loss.png").stat().st_size > 0
  assert "| perplexity |" in (workdir / "report.md").read_text()
  assert os.listdir(stage / "events")
  assert "step 60/60" in result.stdout
  assert metrics["wall_seconds"] > 0 and metrics["train_tokens_per_second"] > 0


def test_rerun_skips_finished_stages(smoke_run):
  workdir, _ = smoke_run
  result = lm("run", "experiments/pretrain.py:smoke", f"--workdir={workdir}",
              )
  assert result.returncode == 0 and "finished earlier; skipping" in result.stdout


def test_sample_continues_what_the_model_learned(smoke_run):
  workdir, _ = smoke_run
  result = lm("sample", f"--checkpoint={workdir / 'pretrain'}", "--prompt_ids=10,12,14,16,18",
              "--temperature=0", "--max_new_tokens=4")
  assert result.returncode == 0, result.stderr[-2000:]
  line = [l for l in result.stdout.splitlines() if l.startswith("output ids:")][0]
  assert json.loads(line.split(":", 1)[1])[:2] == [20, 22]


def test_eval_reruns_the_stage_evaluations(smoke_run):
  workdir, _ = smoke_run
  result = lm("eval", "experiments/pretrain.py:smoke", f"--workdir={workdir}", "--stage=pretrain")
  assert result.returncode == 0, result.stderr[-2000:]
  metrics = json.loads(result.stdout[result.stdout.index("{"):])
  saved = json.loads((workdir / "pretrain" / "metrics.json").read_text())
  assert abs(metrics["loss"] - saved["loss"]) < 1e-5


def test_misspelled_override_names_the_field(tmp_path):
  result = lm("run", "experiments/pretrain.py:smoke", f"--workdir={tmp_path}",
              "--config.stages.pretrain.train.stepz=3")
  assert result.returncode != 0
  assert "train.stepz" in result.stderr and "did you mean 'steps'" in result.stderr
  assert not (tmp_path / "pretrain").exists()


def test_unknown_preset_and_missing_experiment(tmp_path):
  result = lm("run", "experiments/pretrain.py:9b", f"--workdir={tmp_path}")
  assert result.returncode != 0 and "unknown preset '9b'" in result.stderr
  result = lm("run", "experiments/nope.py:tiny", f"--workdir={tmp_path}")
  assert result.returncode != 0 and "does not exist" in result.stderr


def test_lm_run_killed_mid_stage_resumes_to_the_same_curve(smoke_run, tmp_path):
  import signal
  import time
  workdir, _ = smoke_run
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "lm.cli", "run", "experiments/pretrain.py:smoke",
         f"--workdir={tmp_path}"]
  process = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  log = tmp_path / "pretrain" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 4):
    time.sleep(0.1)
  process.send_signal(signal.SIGKILL)  # somewhere after step 40: past the step-30 checkpoint
  process.wait()
  assert not (tmp_path / "pretrain" / "metrics.json").exists()
  result = lm("run", "experiments/pretrain.py:smoke", f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr[-2000:]

  def curve(directory):
    rows = [json.loads(l) for l in (directory / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
  assert curve(tmp_path) == curve(workdir)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
  """world -> tokenizer -> pretrain -> SFT -> GAtt -> both RMs -> rejection sampling -> PPO, and
  SFT with preprompted safety demonstrations -> context distillation, at test size, run once for
  every test below."""
  workdir = tmp_path_factory.mktemp("chat")
  # About 19 minutes on 2 cores shared with the other test worker; the timeout only guards
  # against a hang.
  result = lm("run", "experiments/llama2_chat.py:test", f"--workdir={workdir}", timeout=3600)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def metrics_of(workdir, stage):
  return json.loads((workdir / stage / "metrics.json").read_text())


def mean_and_standard_error(gains):
  """The mean of paired differences and its standard error (sample SD / sqrt(n))."""
  mean = sum(gains) / len(gains)
  return mean, (sum((g - mean) ** 2 for g in gains) / (len(gains) - 1) / len(gains)) ** 0.5


def test_pretraining_on_the_world_learns_facts(chat_run):
  metrics = metrics_of(chat_run, "pretrain")
  # 16 people, 4 towns, 8 pets (32 probes): guessing the right kind of word scores about 0.19
  # (three standard errors above it is 0.40); a random model scores 0. Measured 0.78 at the
  # preset's 320 steps (1.00 and 0.97 on the worlds of seeds 1 and 2; README, Tests).
  assert metrics["fact_accuracy"] >= 0.75
  assert metrics["perplexity"] < 4.0
  assert (chat_run / "pretrain" / "tokenizer.model").exists()


def test_sft_learns_the_chat_format_and_answers(chat_run):
  sft = metrics_of(chat_run, "sft")
  # The pretrained model has never seen [INST]. Measured after 80 SFT steps: held-out answer
  # loss 7.3 -> 0.97, answers about people SFT never trained on 0.25 -> 0.50 (20 questions; the
  # right kind of word at random, a town of 4, a pet of 8, ..., scores about 0.15; 0.85 and 0.35
  # on the worlds of seeds 1 and 2, README), stop-at-EOS 1.0.
  assert sft["stop_at_eos"] >= 0.9
  assert sft["loss"] < 0.6 * sft["loss_before"]
  assert sft["answer_accuracy"] >= 0.5
  assert sft["answer_accuracy"] > sft["answer_accuracy_before"]


def test_gatt_keeps_the_system_instruction_to_the_last_turn(chat_run):
  gatt = metrics_of(chat_run, "gatt")
  # Before GAtt the SFT model never keeps a system instruction past the turn it came with (SFT
  # data has no persistent instruction): 0 of the ~210 later turns (2-8) of 30 conversations.
  # A GAtt that taught nothing (instruction left in the user turns, loss on the wrong turns)
  # stays there. This test preset's SFT model is weak (it obeys 9 % of inline instructions, so
  # GAtt keeps ~350 examples); after 60 GAtt steps it kept the instruction in 0.13 of the later
  # turns on one CPU (28 of 210; 0.07-0.20 a turn) and 0.064 on another, where 90 steps, the
  # preset's now, keep it in 0.079 (0-0.14 a turn). The threshold, 0.05, is 11 of the 210. The
  # tiny preset keeps it at 70-90 % of its turns to turn 20 (README).
  later = range(2, 9)
  before = [gatt[f"adherence_turn_{t}_before"] for t in later]
  after = [gatt[f"adherence_turn_{t}"] for t in later]
  assert max(before) <= 0.1
  assert sum(after) / len(after) >= sum(before) / len(before) + 0.05
  assert gatt["adherence_last_turn"] > gatt["adherence_last_turn_before"]
  rows = [json.loads(l) for l in (chat_run / "gatt" / "gatt_data.jsonl").read_text().splitlines()]
  assert len(rows) == gatt["data_kept"] > 100
  for row in rows[:50]:  # the instruction is the system message, never in a user turn
    system, users = row["messages"][0]["content"], row["messages"][1::2]
    assert row["messages"][0]["role"] == "system"
    assert all(system not in m["content"] for m in users)
  assert gatt["data_generation_seconds"] > 0 and gatt["data_generation_tokens_per_second"] > 0


def test_the_report_has_every_stage_and_the_adherence_table(chat_run):
  report = (chat_run / "report.md").read_text()
  assert "## sft" in report and "Instruction adherence by dialogue turn" in report
  assert (chat_run / "gatt" / "adherence.png").stat().st_size > 1000



def test_reward_models_rank_by_rating_and_flag_unsafe_answers(chat_run):
  """Chance is 0.5 on every bucket (a zero head, where both RMs start, scores 0: ties, 0.0)."""
  helpful = metrics_of(chat_run, "rm_helpful")
  # Table 8's shape: separable pairs far above similar ones. Measured 0.81-0.91 on the ~96
  # significantly-better test pairs (four chains on a 2-core AMD EPYC: CI's, and the pretraining
  # rows streamed on the worlds of seeds 0-2; a coin reaches 0.75 there with odds below one in a
  # million; one standard error at 0.8 is 0.04) and 0.08-0.40 on the ~50 negligibly-better
  # ones. Over all 320 helpfulness test pairs this small RM measures 0.61-0.63, too near chance
  # to test; the tiny preset's 0.64 over 300 pairs is in the README. Its accuracy on the safety
  # test pairs, part of its mix, measures 0.95-0.98 (chance 0.5).
  assert helpful["accuracy_significantly_better"] >= 0.75
  assert helpful["accuracy_significantly_better"] >= helpful["accuracy_negligibly_better"] + 0.15
  assert helpful["safety_test_accuracy"] >= 0.75  # cross-evaluated on the other RM's test set
  safety = metrics_of(chat_run, "rm_safety")
  assert safety["unsafe_recall@0.5"] >= 0.8 and safety["accuracy_safe_unsafe"] >= 0.8
  stats = json.loads((chat_run / "rm_safety" / "reward.json").read_text())
  assert stats["score_std"] > 0 and stats["track"] == "safety"
  report = (chat_run / "report.md").read_text()
  assert "Table 8's shape" in report and "Table 29's shape" in report
  assert (chat_run / "rm_helpful" / "scores.png").stat().st_size > 1000


def test_rejection_sampling_picks_safe_answers_and_the_model_learns_them(chat_run):
  rs = metrics_of(chat_run, "rs_v1")
  # Figure 7: the best of 8 samples above the median of 8 (at N = 1 they are the same sample).
  assert rs["data_reward_vs_n_max"][0] == rs["data_reward_vs_n_median"][0]
  assert rs["data_reward_vs_n_max"][-1] >= rs["data_reward_vs_n_median"][-1] + 0.03
  assert rs["data_mean_reward_picked"] > rs["data_mean_reward_samples"]
  # Learning: the RMs' mean reward of 4 samples per held-out prompt (128 prompts, the same keys
  # before and after), after fine-tuning on the best of 8. Measured on the Xeon over three worlds
  # (seeds 0-2) and two stage seeds each, with 64 prompts: gains 0.041-0.112 (paired standard
  # errors 0.014-0.024). The control, the same stage fine-tuning on one unselected sample per
  # prompt, gained 0.003-0.033 (finished answers are still preferred, a weak selection of their
  # own). With 128 prompts on a 2-core AMD EPYC: 0.101 (paired SE 0.019) in CI's chain; with
  # the pretraining rows streamed, 0.072 and 0.085 on the worlds of seeds 1 and 2 and 0.014 on
  # seed 0's (README, Tests). The threshold is the control's range or noise (2.5 paired standard
  # errors), whichever is higher.
  # Greedy replies are no measure here: under the control they moved by as much as under best
  # of 8 on some seeds (0.013-0.039 against 0.019-0.147), as the mode of a small model flips.
  before_rows, after_rows = (
      [json.loads(l)["reward"] for l in (chat_run / "rs_v1" / f"eval_{when}_samples.jsonl")
       .read_text().splitlines()] for when in ("before", "after"))
  assert len(before_rows) == len(after_rows) == 128
  assert rs["rm_reward_sampled"] == pytest.approx(sum(after_rows) / 128, abs=1e-9)
  gains = [b - a for a, b in zip(before_rows, after_rows)]
  mean, paired_se = mean_and_standard_error(gains)
  assert mean >= max(0.035, 2.5 * paired_se)
  rows = [json.loads(l) for l in (chat_run / "rs_v1" / "rs_data.jsonl").read_text().splitlines()]
  assert len(rows) == rs["data_kept"] and all(r["messages"][-1]["content"] for r in rows)
  samples = (chat_run / "rs_v1" / "samples.jsonl").read_text().splitlines()
  assert len(samples) == rs["data_prompts"]
  assert all(len(json.loads(l)["answers"]) == rs["data_samples_per_prompt"] for l in samples)
  assert "Figure 7's shape" in (chat_run / "report.md").read_text()
  assert (chat_run / "rs_v1" / "reward_vs_n.png").stat().st_size > 1000
  assert rs["data_sampling_seconds"] > 0 and rs["data_scoring_seconds"] > 0


def test_lm_score_agrees_with_the_reward_stage_and_keeps_the_order(chat_run, tmp_path):
  pairs = chat_run / "world" / "preferences" / "helpful" / "eval.jsonl"
  out = tmp_path / "scores.jsonl"
  result = lm("score", f"--checkpoint={chat_run / 'rm_helpful'}", f"--input={pairs}",
              f"--output={out}", "--seq_len=384", "--batch_size=16")
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r["line"] for r in rows] == list(range(1, len(rows) + 1))
  assert all(0.0 <= r["chosen_score"] <= 1.0 for r in rows)
  accuracy = sum(r["chosen_score"] > r["rejected_score"] for r in rows) / len(rows)
  assert accuracy == pytest.approx(metrics_of(chat_run, "rm_helpful")["accuracy"], abs=1e-9)
  first = json.loads(pairs.read_text().splitlines()[0])
  dialogue = {"messages": [{"role": "user", "content": first["prompt"]},
                           {"role": "assistant", "content": first["chosen"]}]}
  mixed = tmp_path / "mixed.jsonl"
  mixed.write_text(json.dumps(dialogue) + "\n" + json.dumps(first) + "\n" + '{"messages": 3}\n')
  result = lm("score", f"--checkpoint={chat_run / 'rm_helpful'}", f"--input={mixed}",
              f"--output={tmp_path / 'bad.jsonl'}", "--seq_len=384")
  assert result.returncode != 0 and "mixed.jsonl:3:" in result.stderr
  assert not (tmp_path / "bad.jsonl").exists()  # nothing half-written
  result = lm("score", f"--checkpoint={chat_run / 'rm_helpful'}", f"--input={mixed}",
              f"--output={tmp_path / 'mixed_scores.jsonl'}", "--seq_len=384", "--skip_bad_rows")
  assert result.returncode == 0, result.stderr[-2000:]
  scored = [json.loads(l) for l in (tmp_path / "mixed_scores.jsonl").read_text().splitlines()]
  assert [r["line"] for r in scored] == [1, 2]
  assert scored[0]["score"] == pytest.approx(rows[0]["chosen_score"], abs=1e-6)


def test_ppo_raises_the_reward_of_its_samples_on_held_out_prompts(chat_run):
  ppo = metrics_of(chat_run, "ppo")
  curve = ppo["eval_curve"]
  before, after = curve[0], curve[-1]
  assert before["iteration"] == 0 and before["kl_sampled"] == pytest.approx(0.0, abs=1e-6)
  # The RMs' mean reward of 8 samples per held-out prompt, the same keys before and after:
  # measured 0.506 -> 0.592 over 16 iterations, at 2.0 nats from π_0, on a 2-core AMD EPYC
  # (with 4 samples, 0.494 -> 0.580 at 1.9 nats on a Xeon). A policy that drifted as far in no
  # useful direction would move each prompt's mean up or down at random: the paired standard
  # error of the difference over the 64 prompts measures 0.014-0.021, so the threshold,
  # max(0.035, 2.5 of them), is 0.035-0.053 (chance passes 2.5 of them 0.6 % of the time).
  before_rows, after_rows = (
      [json.loads(l)["reward"] for l in (chat_run / "ppo" / f"eval_{name}_samples.jsonl")
       .read_text().splitlines()] for name in ("before", f"iteration_{after['iteration']}"))
  assert len(before_rows) == len(after_rows) == 64
  gains = [b - a for a, b in zip(before_rows, after_rows)]
  mean, paired_se = mean_and_standard_error(gains)
  assert after["rm_reward_sampled"] == pytest.approx(sum(after_rows) / 64, abs=1e-9)
  assert mean >= max(0.035, 2.5 * paired_se)
  assert after["kl_sampled"] > 0
  assert ppo["best_iteration"] == after["iteration"]
  rows = [json.loads(l)
          for l in (chat_run / "ppo" / "state" / "metrics.jsonl").read_text().splitlines()]
  iterations = [r for r in rows if r["kind"] == "iteration"]
  assert len(iterations) == ppo["iterations"]
  assert iterations[0]["kl_k1"] == pytest.approx(0.0, abs=1e-6)  # the policy is π_0 at first
  assert all(r["rollout_seconds"] > 0 and r["update_seconds"] > 0 for r in iterations)
  assert "Where the time went" in (chat_run / "report.md").read_text()


def test_context_distillation_makes_the_model_safe_without_the_preprompt(chat_run):
  cd = metrics_of(chat_run, "safety_cd")
  # The starting model saw refusals only behind a generic preprompt, and the look-alikes'
  # helpful answers without one: on the training prompts, measured safe 0.74-0.97 of the time
  # with a preprompt and 0.10-0.42 without (four chains on a 2-core AMD EPYC; README, Tests).
  assert cd["data_preprompted_gold_safe_rate"] >= cd["data_original_gold_safe_rate"] + 0.4
  # Learning: each held-out adversarial prompt (~58) answered greedily without any preprompt,
  # before and after, judged by the world's gold rule. Measured 0.09 -> 0.77 in CI's chain, and
  # 0.11 -> 0.72, 0.50 -> 0.87, 0.26 -> 0.96 with the pretraining rows streamed on the worlds of
  # seeds 0-2 (gains 0.37-0.70, paired standard errors 0.062-0.067). How safe the starting
  # model is without a preprompt depends on the world (it generalises the refusals further on
  # some), so the test is on the gain. A stage that distilled nothing would leave the same model
  # (gain 0, or as far as noise moves it: 2.5 paired SE); fine-tuning on its own helpful
  # answers teaches no refusal. 0.5 after is three binomial standard errors below the lowest
  # measured.
  before_rows, after_rows = (
      [json.loads(l) for l in (chat_run / "safety_cd" / f"eval_{when}.jsonl").read_text()
       .splitlines()] for when in ("before", "after"))
  assert [r["messages"] for r in before_rows] == [r["messages"] for r in after_rows]
  gains = [b["gold"] - a["gold"] for a, b in zip(before_rows, after_rows) if a.get("is_safety")]
  assert len(gains) == cd["gold_safety_prompts"] >= 40
  mean, paired_se = mean_and_standard_error(gains)
  assert mean == pytest.approx(cd["gold_safe_rate"] - cd["gold_safe_rate_before"], abs=1e-9)
  assert mean >= max(0.25, 2.5 * paired_se)
  assert cd["gold_safe_rate"] >= 0.5
  rows = [json.loads(l) for l in (chat_run / "safety_cd" / "cd_data.jsonl").read_text()
          .splitlines()]
  # No preprompt reaches a training row, and targeted CD kept exactly the rows it counted.
  assert all(m["role"] != "system" for r in rows for m in r["messages"])
  assert sum(r["distilled"] for r in rows) == cd["data_distilled"]
  # The side effect §8.4 warns of, reported beside it (measured 0.00 -> 0.81 on the look-alikes).
  assert "false_refusal_rate_lookalikes" in cd and "false_refusal_rate_lookalikes_before" in cd
