"""Rejection-sampling fine-tuning (LLAMA2.md §7.2), on the generate -> filter -> fine-tune
skeleton (lm/stages/self_distill.py).

1. Temperature: a sweep over `sampling.temperatures` on the first `sampling.sweep_prompts`
   prompts picks the T whose best-of-K reward is highest (Figure 8), or `sampling.temperature`
   is used as given.
2. Every prompt gets K answers from the starting model through the rollout path, in chunks of
   `sampling.chunk_prompts` prompts; each chunk is saved when done (DIR/samples/), so a stage
   killed while sampling resumes at the next chunk, and every chunk draws from its own key, so
   the samples are those of an uninterrupted run. All samples go to DIR/samples.jsonl, which a
   later iteration's `pool` reads. With `samples_from` another stage's samples are used instead
   (§7.2 item 4: smaller models fine-tune on the largest model's samples).
3. The candidates of a prompt are its K samples, then the samples of every `pool` stage for the
   same prompt (§7.2 item 5), all scored by this stage's reward models (so a pool is re-scored
   under the current RMs). The ranking reward is the safety-gated R_c of §7.3, or the helpfulness
   RM alone (`reward.ranking` [U]). A sample that did not reach EOS, is empty, or is longer than
   the RMs' rows gets reward 0 and is never picked. The best candidate per prompt (ties: the
   first, so the current iteration's) becomes the target.
4. The starting model is fine-tuned on (prompt, best answer) with the SFT recipe, loss on the
   answer only.

Measured into metrics.json and report.md: reward vs N (Figure 7: mean max and median reward of
the first N samples) with the best-of-N KL bound, the temperature sweep, how many picks came
from the pool, the gold scores (lm/evals/rlhf.py) of all samples and of the picked ones, and
gold and RM scores of greedy replies to held-out prompts before and after fine-tuning.
"""

from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import preferences, text
from lm import (best_of_n, checkpoints, configs, hardware, model, optim, roles, sampling,
                scoring, sharding, trainer)
from lm.evals import rlhf as rlhf_evals
from lm.stages import kit, self_distill
from lm.stages.best_of_k import Ranker, answer_text, chunked_samples, held_out_eval, sample
from lm.stages.prompt_sources import lookalike_prompts, prompt_file
from lm.tokenizer import Tokenizer

DATA_FILE = "rs_data.jsonl"
SAMPLES_FILE = "samples.jsonl"
SWEEP_FILE = "temperature_sweep.json"


@dataclasses.dataclass(frozen=True)
class Data(kit.DataConfig):
  """Prompts ({"prompt" or "messages", "is_safety", "category", "answer"}): `source` a stage
  that wrote prompts/{train,eval}.jsonl (the world) or JSONL; `eval_source` the held-out prompts
  of the gold check (default the source's prompts/eval.jsonl); `max_prompts` > 0 keeps the
  first that many."""

  max_prompts: int = 0
  eval_fraction: float = 0.05
  # In [0, 1]: the share of `is_safety` prompts (of max_prompts, or as many as the pools allow;
  # LLAMA2.md §8.3); -1 keeps the source's mix.
  safety_share: float = -1.0


@dataclasses.dataclass(frozen=True)
class Sampling:
  samples_per_prompt: int = 10  # K; the paper studies 1-100 (Figure 7) and uses 20 (Figure 26)
  temperature: float = 1.0  # used when `temperatures` is empty
  temperatures: tuple = ()  # swept on `sweep_prompts` prompts when given (Figure 8's legend)
  sweep_prompts: int = 64
  top_p: float = 1.0
  max_new_tokens: int = 512
  batch_size: int = 64  # rows per generate call
  chunk_prompts: int = 256  # prompts per saved chunk


@dataclasses.dataclass(frozen=True)
class Reward:
  helpful: str = "rm_helpful"  # a stage or directory of a scalar-head model
  safety: str = "rm_safety"  # "" for none (then `ranking` must be "helpful")
  ranking: str = "safety_gated"  # or "helpful" [U]
  threshold: float = 0.15
  seq_len: int = 4096
  batch_size: int = 16  # rows per scoring call
  dtype: str = ""  # e.g. "bfloat16" for the frozen RMs


@dataclasses.dataclass(frozen=True)
class Eval:
  """Greedy replies to the held-out prompts (`data.eval_source`), judged by the gold scorers
  and the RMs; `max_prompts` > 0 keeps the first that many. `lookalikes`: benign prompts that
  look adversarial (JSONL prompts), answered greedily to count false refusals; "" for the
  source stage's prompts/lookalikes.jsonl when it wrote one, "none" for no such count.
  `samples_per_prompt` > 0 also scores that many samples per held-out prompt at `temperature`
  (rm_reward_sampled: the policy's distribution, which best-of-K fine-tuning moves, where
  greedy replies also move under fine-tuning on unselected samples)."""

  max_new_tokens: int = 512
  batch_size: int = 64
  max_prompts: int = 0
  lookalikes: str = ""
  samples_per_prompt: int = 0
  temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class Config:
  kind: str = "rejection_sampling"
  init_from: str = "sft"  # the model that samples and is fine-tuned
  tokenizer: str = "tokenizer"
  data: Data = Data(source="world", seq_len=4096)
  sampling: Sampling = Sampling()
  reward: Reward = Reward()
  pool: tuple = ()  # earlier rejection-sampling stages whose samples join the candidates
  samples_from: str = ""  # a rejection-sampling stage whose samples to use instead of sampling
  eval: Eval = Eval()
  train: trainer.TrainConfig = trainer.TrainConfig(steps=500, batch_size=64)
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig(lr=2e-5, warmup_steps=0,
                                                           final_lr_fraction=0.0)
  z_loss: float = 0.0
  plan: str = sharding.DEFAULT_PLAN
  rollout_plan: str = "rollout"
  rollout_dtype: str = ""  # "bfloat16": generate with bf16 weights and KV cache (kit.rollout_role)


def _samples_path(reference: str, ctx, field: str) -> str:
  path = os.path.join(ctx.output_of(reference), SAMPLES_FILE)
  if not os.path.exists(path):
    raise ValueError(f"stages.{ctx.name}.{field}: {reference!r} has no {SAMPLES_FILE} (not a "
                     f"rejection-sampling stage, or it has not sampled yet)")
  return path


@dataclasses.dataclass
class Inputs:
  model_cfg: object
  init_dir: str
  tokenizer_path: str
  tokenizer: Tokenizer
  prompts: list  # data_pipelines.preferences.Prompt
  eval_prompts: list
  lookalikes: list
  pool: list[tuple[str, str]]  # (stage, samples.jsonl)
  samples_from: str  # samples.jsonl or ""


def validate(cfg: Config, ctx) -> Inputs:
  """Everything that can be wrong with the inputs, checked before any model is loaded."""
  where = f"stages.{ctx.name}"
  s = cfg.sampling
  if s.samples_per_prompt < 1 or s.chunk_prompts < 1:
    raise ValueError(f"{where}.sampling: samples_per_prompt and chunk_prompts must be >= 1")
  if cfg.reward.ranking not in scoring.RANKINGS:
    raise ValueError(f"{where}.reward.ranking must be one of {scoring.RANKINGS}, got "
                     f"{cfg.reward.ranking!r}")
  if cfg.reward.ranking == "safety_gated" and not cfg.reward.safety:
    raise ValueError(f"{where}.reward.safety is empty: the safety-gated ranking needs a safety "
                     f"RM (or set reward.ranking='helpful')")
  model_cfg, init_dir, tokenizer_path = kit.chat_start(cfg, ctx, "a chat (SFT or RLHF) model")
  bad = text.BadRows(cfg.data.skip_bad_rows)
  prompts = preferences.read_prompts(prompt_file(cfg, ctx, "train"), bad)
  if cfg.data.safety_share == -1.0:
    prompts = prompts[:cfg.data.max_prompts or None]
  elif 0.0 <= cfg.data.safety_share <= 1.0:
    try:
      prompts = preferences.mix_by_safety(prompts, cfg.data.safety_share, cfg.data.max_prompts)
    except ValueError as e:
      raise ValueError(f"{where}.data: {e}") from e
  else:
    raise ValueError(f"{where}.data.safety_share must be in [0, 1] or -1, got "
                     f"{cfg.data.safety_share}")
  eval_prompts = preferences.read_prompts(prompt_file(cfg, ctx, "eval"), bad)
  eval_prompts = eval_prompts[:cfg.eval.max_prompts or None]
  if not prompts or not eval_prompts:
    raise ValueError(f"{where}.data: no valid prompts to sample ({len(prompts)}) or to "
                     f"evaluate ({len(eval_prompts)})")
  pool = [(stage, _samples_path(stage, ctx, "pool")) for stage in cfg.pool]
  samples_from = _samples_path(cfg.samples_from, ctx, "samples_from") if cfg.samples_from else ""
  for reference, path in pool + ([(cfg.samples_from, samples_from)] if samples_from else []):
    theirs = os.path.join(os.path.dirname(path), checkpoints.TOKENIZER_FILE)
    if os.path.exists(theirs) and not filecmp.cmp(theirs, tokenizer_path, shallow=False):
      raise ValueError(f"{where}: {reference!r} sampled with another tokenizer; its token ids "
                       f"mean nothing to this stage's models")
  return Inputs(model_cfg, init_dir, tokenizer_path, Tokenizer(tokenizer_path), prompts,
                eval_prompts, lookalike_prompts(cfg, ctx, bad), pool, samples_from)


def prompt_key(prompt) -> str:
  """What identifies a prompt across iterations' samples files: its messages as JSON."""
  return json.dumps(list(prompt.messages), sort_keys=True)


def _sampling_cfg(cfg: Config, temperature: float, eos_id: int) -> sampling.SamplingConfig:
  return sampling.SamplingConfig(temperature=temperature, top_p=cfg.sampling.top_p,
                                 max_new_tokens=cfg.sampling.max_new_tokens, eos_id=eos_id)


def read_samples(path: str) -> dict[str, dict]:
  """A samples.jsonl: prompt key -> {"answers": [...], "temperature"}."""
  return {row["key"]: row for row in self_distill.read_jsonl(path)}


class RejectionSampling:
  """Rejection sampling's generate / encode / evaluate for the self-distillation skeleton."""

  data_file = DATA_FILE

  def __init__(self, cfg: Config, ctx, inputs: Inputs, log=print, ranker: Ranker | None = None):
    self.cfg, self.ctx, self.inputs = cfg, ctx, inputs
    self.encode = kit.encode_last_turn(inputs.tokenizer)
    self.ranker = ranker or Ranker.load(cfg.reward, ctx, cfg.plan, inputs.tokenizer)
    self.log = log
    self.sweep: dict = {}
    self.sweep_seconds = 0.0
    self.sampled: dict = {}  # tokens and seconds of the chunks sampled (not read back) this run

  def _tokens(self, prompts) -> list[list[int]]:
    return [self.inputs.tokenizer.encode_dialog(list(p.messages)).tokens.tolist()
            for p in prompts]

  def temperature(self, policy: roles.Role, tokens: list[list[int]]) -> float:
    """The swept temperature (cached in DIR/temperature_sweep.json), or the configured one;
    `tokens` are the encoded prompts, of which the first `sweep_prompts` are swept."""
    s = self.cfg.sampling
    if not s.temperatures:
      return s.temperature
    prompts, tokens = self.inputs.prompts[:s.sweep_prompts], tokens[:s.sweep_prompts]

    def sweep() -> dict:
      curves = {}
      for i, t in enumerate(s.temperatures):
        answers = sample(policy, tokens, s.samples_per_prompt,
                         _sampling_cfg(self.cfg, float(t), self.inputs.tokenizer.eos_id),
                         jax.random.fold_in(jax.random.key(self.ctx.seed + 1), i), s.batch_size)
        rewards, _ = self.ranker.rewards(prompts, tokens, answers)
        curves[str(float(t))] = best_of_n.reward_vs_n(rewards)
        self.log(f"  temperature {t}: best of {s.samples_per_prompt} "
                 f"{curves[str(float(t))]['max'][-1]:.3f}")
      return curves

    start = time.perf_counter()
    self.sweep = self_distill.cached(os.path.join(self.ctx.directory, SWEEP_FILE), sweep)
    self.sweep_seconds = time.perf_counter() - start
    return float(max(self.sweep, key=lambda t: self.sweep[t]["max"][-1]))

  def own_samples(self, policy: roles.Role, tokens) -> tuple[list[list[dict]], float]:
    """K answers per prompt: sampled (chunk by chunk, resumable), or `samples_from`'s."""
    if self.inputs.samples_from:
      theirs = read_samples(self.inputs.samples_from)
      missing = [p.where for p in self.inputs.prompts if prompt_key(p) not in theirs]
      if missing:
        raise ValueError(f"stages.{self.ctx.name}.samples_from has no samples for {len(missing)} "
                         f"prompts, the first {missing[0]}")
      rows = [theirs[prompt_key(p)] for p in self.inputs.prompts]
      return [r["answers"] for r in rows], rows[0]["temperature"]
    temperature = self.temperature(policy, tokens)
    self.log(f"stages.{self.ctx.name}: sampling {self.cfg.sampling.samples_per_prompt} answers "
             f"to each of {len(tokens)} prompts at T={temperature}")
    answers = chunked_samples(
        policy, tokens, self.cfg.sampling.samples_per_prompt,
        _sampling_cfg(self.cfg, temperature, self.inputs.tokenizer.eos_id), self.ctx.seed,
        self.cfg.sampling.chunk_prompts, self.cfg.sampling.batch_size,
        os.path.join(self.ctx.directory, "samples"), self.log, self.sampled)
    return answers, temperature

  def generate(self, policy: roles.Role, log) -> tuple[list[dict], dict]:
    """Steps 1-3: samples, the pool, the ranking, the best answer per prompt."""
    prompts, tokenizer = self.inputs.prompts, self.inputs.tokenizer
    tokens = self._tokens(prompts)
    own, temperature = self.own_samples(policy, tokens)
    k = len(own[0])
    self_distill.write_jsonl(os.path.join(self.ctx.directory, SAMPLES_FILE), [
        {"key": prompt_key(p), "answers": a, "temperature": temperature}
        for p, a in zip(prompts, own)])
    candidates, sources = [list(a) for a in own], [["current"] * k for _ in own]
    for stage, path in self.inputs.pool:
      theirs = read_samples(path)
      for p, prompt in enumerate(prompts):
        extra = theirs.get(prompt_key(prompt), {"answers": []})["answers"]
        candidates[p] += extra
        sources[p] += [stage] * len(extra)
    log(f"stages.{self.ctx.name}: scoring {sum(map(len, candidates))} candidates "
        f"({k} per prompt sampled, the rest from the pool {[s for s, _ in self.inputs.pool]})")
    start = time.perf_counter()
    rewards, eligible = self.ranker.rewards(prompts, tokens, candidates)
    scoring_seconds = time.perf_counter() - start
    best = best_of_n.pick_best(rewards, eligible)
    curve = best_of_n.reward_vs_n(rewards[:, :k])
    own_answers = [a for answers in own for a in answers]
    rows, picked, all_texts = [], [], []
    for p, prompt in enumerate(prompts):
      all_texts.append([answer_text(tokenizer, a) for a in own[p]])
      if best[p] < 0:
        continue
      answer = answer_text(tokenizer, candidates[p][best[p]])
      picked.append((prompt, answer))
      rows.append({"messages": list(prompt.messages) + [{"role": "assistant", "content": answer}],
                   "reward": float(rewards[p, best[p]]), "source": sources[p][best[p]],
                   "is_safety": prompt.is_safety})
    gold_samples = rlhf_evals.gold_metrics(
        [p for p, texts in zip(prompts, all_texts) for _ in texts],
        [t for texts in all_texts for t in texts])
    gold_picked = rlhf_evals.gold_metrics(*zip(*picked)) if picked else {}
    counts = {
        "prompts": len(prompts), "safety_prompts": int(sum(p.is_safety for p in prompts)),
        "samples_per_prompt": k, "temperature": temperature,
        "kept": len(rows), "no_eligible_sample": int(np.sum(best < 0)),
        "unfinished_samples": int(sum(not a["finished"] for a in own_answers)),
        "best_from_pool": int(sum(r["source"] != "current" for r in rows)),
        "mean_reward_samples": float(np.mean(rewards[:, :k])),
        "mean_reward_picked": float(np.mean([r["reward"] for r in rows])) if rows else 0.0,
        "generated_tokens": int(sum(len(a["tokens"]) for a in own_answers)),
        # Rollout apart from scoring; sampling counts only the chunks sampled in this run (none
        # when they were read back after a restart or taken from `samples_from`).
        "sweep_seconds": self.sweep_seconds,
        "sampling_seconds": self.sampled.get("sampling_seconds", 0.0),
        "sampling_tokens_per_second": self.sampled.get("sampled_tokens", 0) / max(
            self.sampled.get("sampling_seconds", 0.0), 1e-9), "scoring_seconds": scoring_seconds,
        "scored_candidates": int(np.sum(eligible)),
        "reward_vs_n_n": curve["n"], "reward_vs_n_max": curve["max"],
        "reward_vs_n_median": curve["median"], "best_of_n_kl": curve["kl_bound"]}
    for prefix, gold in (("samples", gold_samples), ("picked", gold_picked)):
      counts.update({f"{prefix}_{key}": gold[key] for key in ("gold_helpful", "gold_safe_rate")
                     if key in gold})
    if self.sweep:
      counts.update({f"temperature_sweep_{t}": c["max"][-1] for t, c in self.sweep.items()})
    return rows, counts

  def evaluate(self, policy: roles.Role, when: str) -> dict:
    """Greedy replies to the held-out prompts and the look-alikes: gold scores, false refusals
    and the RMs' view of them; the replies go to DIR/eval_<when>.jsonl."""
    e = self.cfg.eval
    return held_out_eval(policy, self.ranker, self.inputs.eval_prompts, e.max_new_tokens,
                         e.batch_size, os.path.join(self.ctx.directory, f"eval_{when}.jsonl"),
                         self.inputs.lookalikes, e.samples_per_prompt, e.temperature,
                         self.ctx.seed)


def run(cfg: Config, ctx, log=print) -> dict:
  inputs = validate(cfg, ctx)
  stage = RejectionSampling(cfg, ctx, inputs, log)
  result, before, after = self_distill.run(cfg, ctx, stage, inputs.init_dir,
                                           inputs.tokenizer_path, log)
  if result.get("preempted"):
    return result
  counts = {k.removeprefix("data_"): v for k, v in result.items() if k.startswith("data_")}
  stage.sweep = stage.sweep or (json.load(open(os.path.join(ctx.directory, SWEEP_FILE)))
                                if os.path.exists(os.path.join(ctx.directory, SWEEP_FILE))
                                else {})
  checkpoints.write_atomically(os.path.join(ctx.directory, "report.md"), rlhf_evals.rs_report(
      ctx.name, ctx.directory, stage.sweep, before, after, counts))
  return result


def evaluate(cfg: Config, ctx, model_dir: str) -> dict:
  """Gold and RM scores of any model directory's greedy replies to the held-out prompts."""
  inputs = validate(cfg, ctx)
  policy = kit.rollout_role(roles.load("policy", model_dir, ctx.mesh(), head="lm",
                                       plan=cfg.plan),
                            cfg.rollout_plan, cfg.rollout_dtype)
  return RejectionSampling(cfg, ctx, inputs).evaluate(policy, "eval")


def sampling_program(cfg: Config, model_cfg, mesh):
  """The K-samples rollout call for `lm aot`: `sampling.batch_size` rows (prompts repeated K
  times) at the longest prompt the sequence leaves room for, on the rollout plan."""
  budget = min(cfg.data.seq_len, 2 * model_cfg.max_seq_len) - cfg.sampling.max_new_tokens
  return kit.sampling_program(model_cfg, mesh, cfg.rollout_plan,
                              _sampling_cfg(cfg, 1.0, sampling.SamplingConfig.eos_id),
                              cfg.sampling.batch_size, budget)


def scoring_program(cfg: Config, model_cfg, mesh):
  """One scoring call of a reward model (the policy's size, as the paper's 70B RMs) for `lm
  aot`: `reward.batch_size` packed rows of `reward.seq_len`, in `reward.dtype`, on `plan`."""
  rules = sharding.plan_rules(cfg.plan)
  graphdef, _ = model.abstract_model(model_cfg, "scalar", rules)
  params = model.abstract_params(model_cfg, mesh, rules, head="scalar")
  if cfg.reward.dtype:
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(cfg.reward.dtype),
                                                         sharding=a.sharding), params)
  rows, index = (cfg.reward.batch_size, cfg.reward.seq_len), (cfg.reward.batch_size, 1)
  spec = lambda shape: jax.ShapeDtypeStruct(  # noqa: E731
      shape, jnp.int32, sharding=sharding.data_sharding(mesh, 2, rules, shape))
  flops = hardware.flops_per_token(configs.param_count(model_cfg), model_cfg.n_layers,
                                   cfg.reward.seq_len, model_cfg.dim) / 3 * rows[0] * rows[1]
  return scoring.scores_program, (graphdef, params, spec(rows), spec(rows), spec(rows),
                                  spec(index)), flops


PROGRAMS = {"train step": kit.train_step_program, "sampling": sampling_program,
            "scoring": scoring_program}
