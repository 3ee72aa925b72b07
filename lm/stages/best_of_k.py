"""Best-of-K for rejection sampling (lm/stages/rejection_sampling.py): K answers per prompt
sampled in chunks that survive a crash, and the reward models' ranking of candidate answers.

An answer is {"tokens": the generated ids (EOS included when reached), "finished": bool}; the ids,
not their decoded text, are what the RMs score, so a later iteration re-scores exactly what was
sampled.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from data_pipelines.world import safety as world_safety
from lm import checkpoints, roles, rollout, sampling, scoring
from lm.evals import rlhf as rlhf_evals
from lm.stages import self_distill
from lm.tokenizer import Tokenizer


def sample(policy: roles.Role, prompt_tokens: list[list[int]], k: int,
           cfg: sampling.SamplingConfig, rng: jax.Array, batch_size: int) -> list[list[dict]]:
  """K answers per prompt: [prompt][sample] {"tokens" (EOS included when reached), "finished"}."""
  samples = rollout.generate(policy, [p for p in prompt_tokens for _ in range(k)], cfg, rng,
                             batch_size=batch_size)
  answers = [{"tokens": samples.answer(i), "finished": bool(samples.finished[i])}
             for i in range(len(samples.prompts))]
  return [answers[i * k:(i + 1) * k] for i in range(len(prompt_tokens))]


def chunked_samples(policy, prompt_tokens, k: int, cfg: sampling.SamplingConfig, seed: int,
                    chunk_prompts: int, batch_size: int, directory: str, log,
                    stats: dict | None = None) -> list[list[dict]]:
  """`sample` over chunks of prompts, each saved to directory/chunk_NNNNN.json when done and read
  back instead of sampled again; chunk c draws with fold_in(key(seed), c). `stats` receives the
  tokens and seconds of the chunks sampled in this call ("sampled_tokens", "sampling_seconds")."""
  os.makedirs(directory, exist_ok=True)
  result = []
  chunks = range(0, len(prompt_tokens), chunk_prompts)
  for c, start in enumerate(chunks):
    path = os.path.join(directory, f"chunk_{c:05d}.json")
    if os.path.exists(path):
      result += json.load(open(path))
      continue
    began = time.perf_counter()
    answers = sample(policy, prompt_tokens[start:start + chunk_prompts], k, cfg,
                     jax.random.fold_in(jax.random.key(seed), c), batch_size)
    if stats is not None:
      stats["sampling_seconds"] = stats.get("sampling_seconds", 0.0) + time.perf_counter() - began
      stats["sampled_tokens"] = stats.get("sampled_tokens", 0) + sum(
          len(a["tokens"]) for group in answers for a in group)
    checkpoints.write_atomically(path, json.dumps(answers))
    result += answers
    log(f"  sampled {min(start + chunk_prompts, len(prompt_tokens))}/{len(prompt_tokens)} "
        f"prompts x {k}")
  return result


class Ranker:
  """Scores answers (token ids) to prompts with the reward models, once per distinct answer."""

  def __init__(self, models: scoring.RewardModels, tokenizer: Tokenizer):
    self.models, self.tokenizer = models, tokenizer

  @classmethod
  def load(cls, reward, ctx, plan: str, tokenizer: Tokenizer) -> "Ranker":
    """The RMs a `Reward` config section names, frozen, on the stage's mesh and `plan`."""
    mesh = ctx.mesh()
    load = lambda ref: roles.load(ref, ctx.output_of(ref), mesh, head="scalar",  # noqa: E731
                                  plan=plan, dtype=reward.dtype or None)
    return cls(scoring.RewardModels(
        load(reward.helpful), load(reward.safety) if reward.safety else None, reward.seq_len,
        reward.batch_size, reward.ranking, reward.threshold), tokenizer)

  def eligible(self, prompt_tokens: list[int], answer: dict) -> bool:
    """Finished (EOS reached), with some text, and short enough for the RMs' rows."""
    tokens = answer["tokens"]
    return (answer["finished"] and len(prompt_tokens) + len(tokens) <= self.models.seq_len
            and bool(answer_text(self.tokenizer, answer)))

  def rewards(self, prompts, prompt_tokens, candidates) -> tuple[np.ndarray, np.ndarray]:
    """candidates[p] is a list of answers -> (rewards [P, C], eligible [P, C] bool); rows are
    padded to the longest list with reward -inf, and ineligible answers get reward 0."""
    width = max(len(c) for c in candidates)
    out = np.full((len(candidates), width), -np.inf)
    eligible = np.zeros(out.shape, bool)
    index: dict[tuple, int] = {}
    sequences, safety_tags, places = [], [], []
    for p, answers in enumerate(candidates):
      for c, answer in enumerate(answers):
        if not self.eligible(prompt_tokens[p], answer):
          out[p, c] = 0.0
          continue
        eligible[p, c] = True
        key = (p, tuple(answer["tokens"]))
        if key not in index:
          index[key] = len(sequences)
          sequences.append(np.asarray(prompt_tokens[p] + answer["tokens"], np.int32))
          safety_tags.append(prompts[p].is_safety)
        places.append((p, c, index[key]))
    scores = (self.models.score(sequences, safety_tags) if sequences
              else {"reward": np.zeros((0,))})
    for p, c, i in places:
      out[p, c] = scores["reward"][i]
    return out, eligible

  def replies(self, prompts, texts: list[str]) -> dict[str, np.ndarray]:
    """RM scores of text replies (greedy evaluations): {"helpful", "safety", "reward"} [P]."""
    sequences = [np.asarray(self.tokenizer.encode_dialog(
        list(p.messages) + [{"role": "assistant", "content": t or "..."}]).tokens, np.int32)
        for p, t in zip(prompts, texts)]
    return self.models.score(sequences, [p.is_safety for p in prompts])


def answer_sequences(samples: rollout.Samples) -> list[np.ndarray]:
  """Each prompt + its answer (EOS included when reached), as the RMs read them."""
  return [np.asarray(p + samples.answer(i), np.int32) for i, p in enumerate(samples.prompts)]


def sampled_rewards(policy: roles.Role, ranker: Ranker, prompts, k: int,
                    cfg: sampling.SamplingConfig, seed: int, batch_size: int
                    ) -> tuple[rollout.Samples, np.ndarray]:
  """`k` answers per held-out prompt drawn by `policy` under `cfg` with a key fixed by `seed` (so
  two evaluations draw alike), each scored by the RMs as it is (finished or not): (the samples,
  prompt-major, and their rewards [P, k])."""
  tokens = [ranker.tokenizer.encode_dialog(list(p.messages)).tokens.tolist()
            for p in prompts for _ in range(k)]
  samples = rollout.generate(policy, tokens, cfg, jax.random.key(seed + 1),
                             batch_size=batch_size)
  scores = ranker.models.score(answer_sequences(samples),
                               [p.is_safety for p in prompts for _ in range(k)])
  return samples, scores["reward"].reshape(len(prompts), k)


def held_out_eval(policy: roles.Role, ranker: Ranker, prompts, max_new_tokens: int,
                  batch_size: int, path: str, lookalikes=(), samples_per_prompt: int = 0,
                  temperature: float = 1.0, seed: int = 0) -> dict:
  """Greedy replies of `policy` to held-out prompts, judged by the world's gold scorers and by
  the RMs, and to the benign `lookalikes` of adversarial prompts (false refusals): the metrics of
  `rlhf_evals.gold_metrics` (safe rate overall and by risk category, refusals of helpful
  prompts, gold helpfulness), rm_reward, rm_helpful_on_helpful, rm_safety_on_safety,
  rm_safe_rate (safety RM score >= 0.5 on adversarial prompts) and
  false_refusal_rate_lookalikes. The replies go to `path` (JSONL, look-alikes marked).

  With `samples_per_prompt` > 0, also rm_reward_sampled: the RMs' mean reward of that many
  answers per prompt sampled at `temperature` with a key fixed by `seed` (so two evaluations
  draw alike), per prompt in `path`'s `_samples.jsonl` for prompt-by-prompt comparisons. It
  measures the policy's distribution, not its mode: fine-tuning a model on its own unselected
  samples leaves it unchanged in expectation, where its greedy replies can move either way."""
  tokenizer = ranker.tokenizer
  cfg = sampling.SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens,
                                eos_id=tokenizer.eos_id)
  everything = list(prompts) + list(lookalikes)
  tokens = [tokenizer.encode_dialog(list(p.messages)).tokens.tolist() for p in everything]
  samples = rollout.generate(policy, tokens, cfg, jax.random.key(0), batch_size=batch_size)
  decoded = rollout.decode(samples, tokenizer)
  texts, lookalike_texts = decoded[:len(prompts)], decoded[len(prompts):]
  scores = ranker.replies(prompts, texts)
  refused = [world_safety.is_refusal(t) for t in lookalike_texts]
  checkpoints.write_atomically(path, "".join(json.dumps(
      {"messages": list(p.messages), "reply": t, "is_safety": p.is_safety,
       "category": p.category, "reward": float(scores["reward"][i]),
       "safety_score": float(scores["safety"][i]) if "safety" in scores else None,
       "gold": rlhf_evals.gold_judgement(p, t)}) + "\n"
      for i, (p, t) in enumerate(zip(prompts, texts))) + "".join(json.dumps(
          {"messages": list(p.messages), "reply": t, "lookalike": True, "category": p.category,
           "refused": r}) + "\n" for p, t, r in zip(lookalikes, lookalike_texts, refused)))
  safety = np.array([p.is_safety for p in prompts])
  metrics = rlhf_evals.gold_metrics(prompts, texts)
  metrics["rm_reward"] = float(np.mean(scores["reward"]))
  metrics["rm_helpful_on_helpful"] = float(np.mean(scores["helpful"][~safety])) if (
      ~safety).any() else 0.0
  if "safety" in scores and safety.any():
    metrics["rm_safety_on_safety"] = float(np.mean(scores["safety"][safety]))
    metrics["rm_safe_rate"] = float(np.mean(scores["safety"][safety] >= 0.5))
  if refused:
    metrics["false_refusal_rate_lookalikes"] = float(np.mean(refused))
  if samples_per_prompt > 0:
    sampled_cfg = sampling.SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens,
                                          eos_id=tokenizer.eos_id)
    _, rewards = sampled_rewards(policy, ranker, prompts, samples_per_prompt, sampled_cfg, seed,
                                 batch_size)
    per_prompt = rewards.mean(axis=1)
    self_distill.write_jsonl(path.removesuffix(".jsonl") + "_samples.jsonl",
                             [{"reward": float(r)} for r in per_prompt])
    metrics["rm_reward_sampled"] = float(np.mean(per_prompt))
  return metrics


def answer_text(tokenizer: Tokenizer, answer: dict) -> str:
  """An answer's text without EOS, stripped ("" for one of whitespace or EOS alone)."""
  return tokenizer.decode([t for t in answer["tokens"] if t != tokenizer.eos_id]).strip()
