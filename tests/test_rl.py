"""The RL loop: each stage on its own (tasks, rollout, behaviour scoring, advantages, update,
evaluation) with fakes and hand values, then two-step runs on 8 devices and exact resume."""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np
import pytest

from lad_jax import advantages
from lad_jax import evaluate
from lad_jax import metrics as metrics_lib
from lad_jax import objectives
from lad_jax import report
from lad_jax import rl
from lad_jax import rollout
from lad_jax import scoring
from lad_jax import sharding
from lad_jax import tasks
from lad_jax import train
from lad_jax.models import Decoder
from lad_jax.models import testing
from lad_jax.models.tokenizer import CharTokenizer
from lad_jax.sampler import FinishedRows, SampleOutput
from lad_jax.verifiers import Result
from saved_runs import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# Host-side pieces
# ------------------------------------------------------------------------------------------------


def fake_task(num_records=32):
  """Questions in memory; reward = share of digits in the response (varies within groups)."""
  records = [{"question": f"What is {i} + {i % 7}?"} for i in range(num_records)]

  def score(responses, recs):
    assert len(responses) == len(recs)
    out = []
    for text in responses:
      share = sum(ch.isdigit() for ch in text) / max(len(text), 1)
      out.append(Result(reward=share, correct=share >= 0.25, reason="fake"))
    return out

  return tasks.Task(train=records, evals={"fake": records[:4]}, question=lambda r: r["question"],
                 score=score)


class _IdEncoder:
  max_tokens = 100

  def __call__(self, record):
    return None if record["n"] % 5 == 4 else [record["n"] + 3]  # every 5th is "too long"


def test_prompt_stream_is_a_pure_function_of_its_position():
  records = [{"n": i} for i in range(12)]
  a = tasks.PromptStream(records, _IdEncoder(), seed=3, shuffle=True)
  first, _ = a.take(7)
  second, ids = a.take(9)  # crosses into the second epoch: a new permutation
  # A stream rebuilt at a saved position continues exactly where the first one was.
  replay = tasks.PromptStream(records, _IdEncoder(), seed=3, shuffle=True)
  assert replay.take(7)[0] == first
  resumed = tasks.PromptStream(records, _IdEncoder(), seed=3, shuffle=True,
                            position=replay.position)
  assert resumed.take(9)[0] == second
  assert all(r["n"] % 5 != 4 for r in first + second)  # too-long prompts are skipped
  assert ids == [[r["n"] + 3] for r in second]
  # One epoch visits every usable record exactly once.
  c = tasks.PromptStream(records, _IdEncoder(), seed=0, shuffle=True)
  epoch, _ = c.take(10)
  assert sorted(r["n"] for r in epoch) == [n for n in range(12) if n % 5 != 4]
  assert c.position == 12


def _fake_rollout(correct_PG, *, prompt_len, response_len, tag):
  """A Rollout whose texts tag each row (100 * tag + row) so tests can follow the rows."""
  p, g = correct_PG.shape
  n = p * g
  resp_mask = np.zeros((n, response_len), bool)
  resp_mask[:, :2] = True
  return rollout.Rollout(
      prompt_tokens=np.full((n, prompt_len), tag, np.int32),
      prompt_mask=np.ones((n, prompt_len), bool),
      response_tokens=np.where(resp_mask, tag, 0).astype(np.int32),
      response_mask=resp_mask,
      logp=np.where(resp_mask, -1.0, 0.0).astype(np.float32),
      truncated=np.zeros((n,), bool),
      lengths=np.full((n,), 2, np.int32),
      rewards=correct_PG.reshape(-1).astype(np.float32),
      correct=correct_PG.reshape(-1),
      texts=np.asarray([str(i + 100 * tag) for i in range(n)], dtype=object),
      reasons=np.asarray(["correct" if c else "wrong" for c in correct_PG.reshape(-1)],
                         dtype=object),
      answers=np.asarray([str(tag)] * n, dtype=object),
      prompt_index=np.repeat(np.arange(p, dtype=np.int64), g))


def _tags(r):
  return [int(t) for t in r.texts]


def test_gather_groups_refills_then_truncates():
  # Round 0 keeps group 1 only, round 1 keeps groups 0 and 2 (wider prompts / responses).
  rounds = [
      _fake_rollout(np.array([[1, 1], [0, 1], [0, 0]], bool), prompt_len=3, response_len=4,
                    tag=1),
      _fake_rollout(np.array([[1, 0], [1, 1], [0, 1]], bool), prompt_len=5, response_len=6,
                    tag=2),
  ]
  calls = []

  def generate(i):
    calls.append(i)
    return rounds[i]

  batch, num_rounds, filled = rollout.gather_groups(
      generate, num_groups=2, group_size=2, pad_id=0, dynamic_sampling=True,
      max_gen_batches=5)
  assert calls == [0, 1] and num_rounds == 2 and filled == 0
  # Kept in order: round 0 group 1, then round 1 group 0; group 2 of round 1 is cut off.
  assert _tags(batch) == [102, 103, 200, 201]
  assert batch.prompt_tokens.shape == (4, 5) and batch.response_tokens.shape == (4, 6)
  # Left padding of the narrower round: its real tokens stay right-aligned and masked in.
  np.testing.assert_array_equal(batch.prompt_mask[0], [False, False, True, True, True])
  np.testing.assert_array_equal(batch.prompt_tokens[0, 2:], [1, 1, 1])
  np.testing.assert_array_equal(batch.response_mask[0], [True, True] + [False] * 4)


def test_gather_groups_shortfall_fills_or_raises():
  only = _fake_rollout(np.array([[1, 1], [0, 1]], bool), prompt_len=3, response_len=4, tag=1)
  batch, rounds, filled = rollout.gather_groups(
      lambda i: only, num_groups=2, group_size=2, pad_id=0, dynamic_sampling=True,
      max_gen_batches=1)
  assert (rounds, filled) == (1, 1)
  assert _tags(batch) == [102, 103, 100, 101]  # kept first, then filled
  with pytest.raises(RuntimeError, match="max_gen_batches"):
    rollout.gather_groups(lambda i: only, num_groups=2, group_size=2, pad_id=0,
                     dynamic_sampling=True, max_gen_batches=1, on_shortfall="error")
  batch, rounds, filled = rollout.gather_groups(
      lambda i: only, num_groups=2, group_size=2, pad_id=0, dynamic_sampling=False,
      max_gen_batches=1)
  assert batch is only and (rounds, filled) == (1, 0)


def _one_device_mesh():
  return sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])


def test_to_train_batch_layout_matches_the_trainer_contract():
  r = _fake_rollout(np.array([[1, 0]], bool), prompt_len=3, response_len=4, tag=5)
  batch = rollout.to_train_batch(r, mesh=_one_device_mesh(), with_prompt_mask=True)
  assert isinstance(batch, train.TrainBatch) and batch.prompt_length == 3
  host = jax.tree.map(np.asarray, batch)
  assert host.tokens.shape == (2, 7) and host.advantages.shape == (2,)
  np.testing.assert_array_equal(host.loss_mask[:, :3], False)  # prompt never scored
  np.testing.assert_array_equal(host.loss_mask[:, 3:], r.response_mask)
  np.testing.assert_array_equal(host.prompt_mask[:, :3], True)
  np.testing.assert_array_equal(host.prompt_mask[:, 3:], False)
  np.testing.assert_array_equal(host.old_logp[:, 3:], r.logp)  # the sampler's logp
  np.testing.assert_array_equal(host.old_logp[:, :3], 0.0)
  assert rollout.to_train_batch(r, mesh=_one_device_mesh()).prompt_mask is None


def test_compute_advantages_matches_the_estimators():
  rewards = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], np.float32)
  got = advantages.compute("grpo", {}, rewards, group_size=3)
  # By hand: group 1 mean 1/3, unbiased std sqrt(1/3); group 2 all equal -> 0.
  s = np.sqrt(1 / 3)
  np.testing.assert_allclose(got, [(2 / 3) / s, -(1 / 3) / s, -(1 / 3) / s, 0, 0, 0], rtol=1e-5)
  np.testing.assert_array_equal(got[3:], 0.0)
  want = advantages.alpha_dpg(np.full((2, 3), -1.0, np.float32), np.full((2, 3), -0.5, np.float32),
                              rewards.reshape(2, 3), alpha=0.5)
  got = advantages.compute("alpha_dpg", {"alpha": 0.5}, rewards, group_size=3,
                           seq_old_logp_N=np.full(6, -1.0), seq_ref_logp_N=np.full(6, -0.5))
  np.testing.assert_allclose(got, advantages.from_groups(want), rtol=1e-6)
  with pytest.raises(ValueError, match="needs seq_old_logp_N"):
    advantages.compute("alpha_dpg", {}, rewards, group_size=3)
  assert advantages.needs_ref("alpha_dpg") and not advantages.needs_ref("grpo")


def test_with_advantages_sums_only_response_logp():
  """ADVANTAGE stage: alpha-DPG reads sequence sums of old / ref logp over the response only."""
  rewards = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], np.float32)
  mask = np.array([[0, 1, 1]] * 6, bool)
  batch = train.TrainBatch(
      tokens=np.zeros((6, 3), np.int32), mask=np.ones((6, 3), bool), loss_mask=mask,
      old_logp=np.where(mask, -0.5, 7.0).astype(np.float32),  # 7.0 on the prompt: ignored
      ref_logp=np.where(mask, -0.25, 9.0).astype(np.float32), advantages=np.zeros(6, np.float32),
      prompt_length=1)
  out, adv = rl.with_advantages(batch, rewards, estimator="alpha_dpg", hparams={"alpha": 0.5},
                                group_size=3, mesh=_one_device_mesh())
  want = advantages.compute("alpha_dpg", {"alpha": 0.5}, rewards, group_size=3,
                            seq_old_logp_N=np.full(6, -1.0), seq_ref_logp_N=np.full(6, -0.5))
  np.testing.assert_allclose(adv, want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out.advantages), want, rtol=1e-6)
  grpo_out, grpo_adv = rl.with_advantages(batch, rewards, estimator="grpo", group_size=3,
                                          mesh=_one_device_mesh())
  np.testing.assert_allclose(grpo_adv, advantages.compute("grpo", {}, rewards, group_size=3))


def test_rollout_metrics_by_hand():
  r = _fake_rollout(np.array([[1, 0], [1, 1]], bool), prompt_len=3, response_len=4, tag=1)
  r = r._replace(lengths=np.array([1, 2, 3, 4], np.int32),
                 truncated=np.array([0, 0, 0, 1], bool))
  r = r._replace(prompt_mask=np.array([[1, 1, 1], [0, 1, 1], [0, 0, 1], [1, 1, 1]], bool))
  m = rollout.rollout_metrics(r, np.array([1.0, -1.0, 0.0, 0.0], np.float32), group_size=2)
  assert m["critic/score/mean"] == m["critic/rewards/mean"] == 0.75
  assert m["critic/acc/mean"] == 0.75
  assert m["batch/zero_variance_frac"] == 0.5 and m["batch/solve_all_frac"] == 0.5
  assert m["response_length/mean"] == 2.5 and m["response_length/max"] == 4
  assert m["response_length/clip_ratio"] == 0.25
  # verl's advantage statistics are over response tokens: (1 * 1 - 1 * 2) / 10 tokens.
  assert m["critic/advantages/mean"] == pytest.approx(-0.1)
  assert (m["prompt_length/mean"], m["prompt_length/max"], m["prompt_length/min"]) == (2.25, 3, 1)
  assert m["prompt_length/clip_ratio"] == 0.5  # two prompts fill the padded width of 3


def test_sample_rows_hold_what_a_reader_needs():
  r = _fake_rollout(np.array([[1, 0], [0, 0]], bool), prompt_len=3, response_len=4, tag=65)
  adv = np.array([1.0, -1.0, 0.0, 0.0], np.float32)
  rows = report.sample_rows(7, r, adv, CharTokenizer(), count=-1)
  assert len(rows) == 4 and len(report.sample_rows(7, r, adv, CharTokenizer(), count=2)) == 2
  assert rows[1] == {"step": 7, "prompt_id": 0, "prompt": "AAA", "response": "6501",
                     "reward": 0.0, "correct": False, "reason": "wrong", "answer": "65",
                     "advantage": -1.0, "response_length": 2, "truncated": False,
                     "logp_sum": -2.0}
  assert rows[2]["prompt_id"] == 1


def test_perf_metrics():
  r = _fake_rollout(np.array([[1, 0]], bool), prompt_len=3, response_len=4, tag=5)
  timings = {"timing_s/step": 2.0, "timing_s/gen": 1.0, "timing_s/update_actor": 0.5}
  m = rl.perf_metrics(r, timings, num_params=10, epochs=1, devices=jax.devices()[:2])
  assert m["perf/total_num_tokens"] == 10 and m["perf/throughput"] == 2.5  # per device
  assert m["timing_per_token_ms/gen"] == 250.0  # 4 response tokens
  assert "perf/mfu/actor" not in m  # no known peak for a CPU


class _Device:
  device_kind = "NVIDIA H100 80GB HBM3"

  @staticmethod
  def memory_stats():
    return {"peak_bytes_in_use": 3 * 2**30}


def test_mfu_and_memory_where_the_hardware_reports_them():
  from lad_jax import perf  # pylint: disable=g-import-not-at-top
  flops = perf.update_flops(num_params=1e9, tokens=1e4)
  assert flops == 6e13
  assert perf.mfu(flops, 1.0, devices=[_Device()] * 2) == pytest.approx(6e13 / (2 * 989e12))
  assert perf.max_memory_allocated_gb([_Device()]) == 3.0
  assert perf.mfu(flops, 1.0, devices=jax.devices()[:1]) is None


class _StubSampler:
  """Writes response i of prompt p as the digits "p i" then EOS, length 1 + (i % 3); logp -0.5."""

  def __init__(self):
    self.keys = []

  def sample(self, params, prompt_ids, key, *, group_size, max_new_tokens, temperature, top_p,
             top_k, on_rows=None):
    """Hands the rows to on_rows as a streaming sampler would: later rows first, in two
    batches (the rollout must put each verdict back on its row)."""
    del params, temperature, top_p, top_k
    self.keys.append(np.asarray(jax.random.key_data(key)))
    n, p_len = len(prompt_ids) * group_size, max(len(ids) for ids in prompt_ids)
    prompts = np.zeros((n, p_len), np.int32)
    resp = np.zeros((n, max_new_tokens), np.int32)
    lengths = np.zeros((n,), np.int32)
    for row in range(n):
      ids = prompt_ids[row // group_size]
      prompts[row, p_len - len(ids):] = ids
      lengths[row] = 1 + row % 3
      resp[row, :lengths[row]] = [ord(str((row + k) % 10)) for k in range(lengths[row])]
    resp_mask = np.arange(max_new_tokens)[None] < lengths[:, None]
    if on_rows is not None:
      half = n // 2
      for rows in (np.arange(half, n), np.arange(half)):
        on_rows(FinishedRows(rows=rows, response_tokens=resp[rows], lengths=lengths[rows]))
    return SampleOutput(prompt_tokens=prompts, prompt_mask=prompts > 0, response_tokens=resp,
                        response_mask=resp_mask, logp=np.where(resp_mask, -0.5, 0.0),
                        truncated=np.zeros((n,), bool), lengths=lengths)


def test_collect_with_a_stub_sampler():
  """COLLECT: prompts from the stream, G samples each, decoded, verified, as one Rollout."""
  task = fake_task()
  stream = tasks.PromptStream(task.train, lambda r: [ord(c) for c in r["question"]], seed=0,
                              shuffle=False)
  sampler = _StubSampler()
  settings = rollout.SampleSettings(group_size=3, max_new_tokens=4)
  got = rollout.collect(sampler, None, stream, task, CharTokenizer(), jax.random.key(7),
                        settings=settings, num_groups=2, pad_id=0)
  r = got.rollout
  assert got.rounds == 1 and got.filled == 0 and stream.position == 2
  assert r.prompt_tokens.shape == (6, len(task.train[1]["question"]))
  assert list(r.texts) == ["0", "12", "234", "3", "45", "567"]
  np.testing.assert_allclose(r.rewards, 1.0)  # every response is all digits
  assert r.correct.all() and r.lengths.tolist() == [1, 2, 3, 1, 2, 3]
  # Round 0 samples with fold_in(key, 0).
  np.testing.assert_array_equal(
      sampler.keys[0], jax.random.key_data(jax.random.fold_in(jax.random.key(7), 0)))
  # Dynamic sampling: every group is all-correct, so both rounds are dropped and refilled.
  got = rollout.collect(sampler, None, stream, task, CharTokenizer(), jax.random.key(7),
                        settings=settings, num_groups=2, pad_id=0, dynamic_sampling=True,
                        max_gen_batches=2)
  assert got.rounds == 2 and got.filled == 2 and stream.position == 6


def test_evaluate_with_a_stub_sampler():
  task = fake_task()
  out = evaluate.evaluate(_StubSampler(), None, task, CharTokenizer(),
                          lambda r: [ord(c) for c in r["question"]], jax.random.key(0),
                          num_prompts=2, pass_k=(1, 2),
                          settings=rollout.SampleSettings(group_size=3, max_new_tokens=4))
  assert out["val-core/fake/acc/mean@3"] == 1.0 and out["val-core/fake/acc/pass@2"] == 1.0
  assert out["val-aux/fake/response_length/mean"] == 2.0
  assert out["val-aux/fake/distinct_correct"] == 3.0  # three different texts per prompt


@pytest.fixture(scope="module")
def tiny_step():
  cfg = testing.tiny_config("llama", num_layers=1, hidden_size=32, intermediate_size=32,
                            num_heads=4, num_kv_heads=2, head_dim=8, vocab_size=128)
  mesh = sharding.make_mesh(data=2, fsdp=1, tensor=1, devices=jax.devices()[:2])
  tx = train.make_optimizer(lr=1e-2)
  state, shardings = train.create_train_state(Decoder(cfg), tx, jax.random.key(0), mesh=mesh)
  spec = train.StepSpec(model_cfg=cfg, objective=objectives.get("lad"), tx=tx)
  step = train.jit_train_step(spec, mesh=mesh, state_shardings=shardings)
  r = _fake_rollout(np.array([[1, 0], [0, 1], [1, 1], [0, 0]], bool), prompt_len=3,
                    response_len=4, tag=5)
  batch = rollout.to_train_batch(r, mesh=mesh)
  batch, _ = rl.with_advantages(batch, r.rewards, estimator="grpo", group_size=2, mesh=mesh)
  return cfg, mesh, state, step, batch


def _copy(tree):
  return jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), tree)


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_score_behaviour_rollout_correction(tiny_step, mode):
  """The sampler's logp (the batch's old_logp before BEHAVIOUR) against the recomputed one:
  IS weights pi_old / pi_sampler, truncated at the cap or rejected outside [1/cap, cap]."""
  cfg, mesh, state, _, batch = tiny_step
  logp_fn = scoring.make_logp_fn(cfg, mesh=mesh)
  params = state.params["model"]
  rng = np.random.default_rng(0)
  mask = np.asarray(batch.loss_mask)
  beh = np.asarray(logp_fn(params, batch.tokens, batch.mask, prompt_length=3))
  beh = np.where(mask, beh + rng.normal(0.0, 1.0, beh.shape), 0.0).astype(np.float32)
  batch = batch.replace(old_logp=jax.device_put(beh, batch.old_logp.sharding))
  out, metrics = rl.score_behaviour(batch, logp_fn=logp_fn, params=params,
                                    recompute_old_logp=True,
                                    correction=rl.Correction("token", mode, 2.0))
  old = np.asarray(out.old_logp)
  rho = np.exp(np.where(mask, old - beh, 0.0))
  if mode == "truncate":
    np.testing.assert_allclose(np.asarray(out.is_weights), np.where(mask, np.minimum(rho, 2.0),
                                                                    0.0), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.loss_mask), mask)
  else:
    keep = mask & (rho >= 0.5 - 1e-6) & (rho <= 2.0 + 1e-6)
    np.testing.assert_array_equal(np.asarray(out.loss_mask), keep)
    np.testing.assert_allclose(np.asarray(out.is_weights), np.where(keep, rho, 0.0), rtol=1e-5)
  assert metrics["rollout/logp_diff_max"] == pytest.approx(np.abs(old - beh)[mask].max(),
                                                           rel=1e-5)
  assert 0.0 <= metrics["rollout_corr/masked_fraction"] < 1.0


def test_update_equals_the_mini_batch_steps_done_by_hand(tiny_step):
  """UPDATE with K = 2 mini-batches x 2 epochs = four train steps on rows [0:4], [4:8], ..."""
  _, _, state, step, batch = tiny_step
  got, metrics = rl.update(_copy(state), batch, train_step=step, mini_batches=2, epochs=2,
                           mesh=tiny_step[1])
  host = jax.tree.map(np.asarray, batch)
  halves = [jax.tree.map(lambda x, i=i: x[4 * i:4 * (i + 1)], host) for i in (0, 1)]
  want, losses = _copy(state), []
  for mb in halves + halves:
    want, m = step(want, mb)
    losses.append(float(m["loss"]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got.params),
               jax.device_get(want.params))
  assert int(got.step) == 4
  np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-6)


def test_update_stops_on_a_streak_of_nonfinite_updates(tiny_step):
  _, mesh, state, step, batch = tiny_step
  bad = batch.replace(advantages=batch.advantages * np.nan)
  with pytest.raises(rl.NonFiniteError, match="2 policy updates in a row"):
    rl.update(_copy(state), bad, train_step=step, mini_batches=2, mesh=mesh, max_nonfinite=2)


def test_score_behaviour_recomputes_old_and_ref_logp_on_device(tiny_step):
  cfg, mesh, state, _, batch = tiny_step
  logp_fn = scoring.make_logp_fn(cfg, mesh=mesh)
  params = state.params["model"]
  out, timings = rl.score_behaviour(batch, logp_fn=logp_fn, params=params, ref_params=params,
                                    recompute_old_logp=True)
  want = np.asarray(logp_fn(params, batch.tokens, batch.mask, prompt_length=3))
  np.testing.assert_array_equal(np.asarray(out.old_logp), want)
  np.testing.assert_array_equal(np.asarray(out.ref_logp), want)
  assert isinstance(out.old_logp, jax.Array)
  assert {"timing_s/old_log_prob", "timing_s/ref", "rollout/logp_diff_abs_mean",
          "rollout/logp_diff_max", "rollout/probs_pearson"} == set(timings)
  assert out.is_weights is None and out.loss_mask is batch.loss_mask  # correction off
  same, timings = rl.score_behaviour(batch, logp_fn=logp_fn, params=params)
  assert same is batch and not timings


# ------------------------------------------------------------------------------------------------
# Whole runs: tiny random model, 8 simulated devices
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  # Runs of one shape share compiled programs through jax's persistent cache.
  return str(tmp_path_factory.mktemp("jax_cache"))


def _params(state):
  return jax.tree.map(np.asarray, jax.device_get(state.params))


@pytest.fixture(scope="module")
def lad_run(tmp_path_factory, compile_cache):
  workdir = tmp_path_factory.mktemp("lad")
  config = tiny_config(workdir, "lad", compile_cache_dir=compile_cache)
  state, last = rl.train_and_evaluate(config, task=fake_task())
  return config, _params(state), last


def _check_run(config, params, last):
  assert len(jax.devices()) == 8
  records = metrics_lib.read_jsonl(os.path.join(config.workdir, "metrics.jsonl"))
  assert [r["step"] for r in records] == [1, 2]
  for name in ("critic/rewards/mean", "response_length/mean", "actor/pg_loss", "actor/entropy",
               "actor/grad_norm", "actor/lr", "batch/zero_variance_frac", "timing_s/gen",
               "timing_s/reward", "timing_s/update_actor", "timing_s/adv", "perf/throughput",
               "critic/score/mean", "prompt_length/clip_ratio", "timing_per_token_ms/gen"):
    assert name in records[0] and np.isfinite(records[0][name]), name
  assert records[0]["actor/lr"] == pytest.approx(config.optim.lr)
  # The fake reward varies within groups, so the advantages and the gradient are not zero.
  assert records[0]["critic/advantages/max"] > 0 > records[0]["critic/advantages/min"]
  assert records[0]["actor/grad_norm"] > 0
  core = "val-core/fake/acc"
  assert f"{core}/mean@4" in last and f"{core}/pass@2" in last
  assert 0.0 <= last[f"{core}/pass@1"] <= last[f"{core}/pass@2"] <= last[f"{core}/pass@4"]
  # A nonzero gradient at a nonzero learning rate moves Adam's parameters (by ~lr each).
  assert all(r["actor/grad_norm"] > 0 for r in records)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  assert os.path.isdir(os.path.join(config.workdir, "checkpoints", "2"))


def test_two_step_run_lad(lad_run):
  _check_run(*lad_run)


def test_continuous_batching_run_equals_lock_step(tmp_path, compile_cache, lad_run):
  """sampling.decode_slots: the same rollouts through 4 refilled slots, so the same training:
  the lock-step run's parameters."""
  config = tiny_config(tmp_path, "lad", compile_cache_dir=compile_cache)
  config.sampling.decode_slots, config.sampling.refill_rows = 4, 2
  state, last = rl.train_and_evaluate(config, task=fake_task())
  params = _params(state)
  _check_run(config, params, last)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, lad_run[1])


@pytest.mark.parametrize("name", ["grpo", "flowrl"])
def test_two_step_run_baselines(tmp_path, compile_cache, name):
  config = tiny_config(tmp_path, name, compile_cache_dir=compile_cache)
  state, last = rl.train_and_evaluate(config, task=fake_task())
  params = _params(state)
  _check_run(config, params, last)
  if name == "flowrl":
    assert "logz_head" in params  # the learned log Z of FlowRL is part of the state


def test_killed_run_resumes_to_the_same_result(tmp_path, compile_cache, lad_run):
  config, params_uninterrupted, _ = lad_run
  first = tiny_config(tmp_path, "lad", compile_cache_dir=compile_cache)
  first.train.num_steps = 1  # "killed" right after the checkpoint of step 1 ...
  rl.train_and_evaluate(first, task=fake_task())
  # ... and after step 2 had logged its rows but before its checkpoint.
  for name in ("metrics.jsonl", "samples.jsonl"):
    with open(tmp_path / name, "a", encoding="utf-8") as f:
      f.write('{"step": 2, "critic/rewards/mean": -1.0, "reward": -1.0}\n')
  resumed = tiny_config(tmp_path, "lad", compile_cache_dir=compile_cache)
  state, _ = rl.train_and_evaluate(resumed, task=fake_task())
  jax.tree.map(np.testing.assert_array_equal, _params(state), params_uninterrupted)
  a = metrics_lib.read_jsonl(os.path.join(config.workdir, "metrics.jsonl"))
  b = metrics_lib.read_jsonl(os.path.join(resumed.workdir, "metrics.jsonl"))
  assert [r["step"] for r in b] == [1, 2]  # the stale step-2 row is gone, not duplicated
  for key in ("critic/rewards/mean", "data/position", "actor/pg_loss"):
    assert a[1][key] == b[1][key], key
  samples = metrics_lib.read_jsonl(os.path.join(resumed.workdir, "samples.jsonl"))
  assert [r["step"] for r in samples] == [1] * 4 + [2] * 4
  assert all(r["reward"] >= 0 for r in samples)


def _flip_largest_file(directory, count=400):
  """Flips `count` bytes in the middle of the largest file under `directory` (same size)."""
  files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    data = f.read(count)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(b ^ 0xFF for b in data))
  return path


def test_damaged_checkpoint_falls_back_and_replays(tmp_path, compile_cache, lad_run, caplog):
  """Bytes flipped in the latest checkpoint: the rerun warns, moves it aside, restores step 1,
  replays step 2, and ends with the uninterrupted run's parameters."""
  _, params_uninterrupted, _ = lad_run
  for steps in (1, 2):
    config = tiny_config(tmp_path, "lad", compile_cache_dir=compile_cache)
    config.train.num_steps = steps
    rl.train_and_evaluate(config, task=fake_task())
  _flip_largest_file(tmp_path / "checkpoints" / "2")
  state, _ = rl.train_and_evaluate(tiny_config(tmp_path, "lad", compile_cache_dir=compile_cache),
                                   task=fake_task())
  jax.tree.map(np.testing.assert_array_equal, _params(state), params_uninterrupted)
  assert any("checkpoint step 2" in r.getMessage() and "damaged" in r.getMessage()
             for r in caplog.records)
  assert os.path.isdir(tmp_path / "checkpoints.damaged" / "2")
  # One config file per start: fresh, resumed after step 1, and again after step 1.
  assert set(os.listdir(tmp_path / "configs")) == {"start_0.json", "start_1.json",
                                                   "start_1.1.json"}


def test_workdir_of_another_run_is_refused_or_archived(tmp_path, compile_cache, lad_run):
  config, _, _ = lad_run
  other = tiny_config(pathlib.Path(config.workdir), "grpo", compile_cache_dir=compile_cache)
  with pytest.raises(rl.ConfigError, match="loss.name: \"lad\" -> \"grpo\""):
    rl.train_and_evaluate(other, task=fake_task())
  fresh = tiny_config(tmp_path, "lad", compile_cache_dir=compile_cache)
  fresh.train.num_steps = 0
  fresh.eval.before_train = True
  fresh.checkpoint.export_hf = True  # a Hugging Face copy of the final policy
  rl.train_and_evaluate(fresh, task=fake_task())
  assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "hf"))
  fresh.checkpoint.resume = False  # starting over moves the earlier run aside
  fresh.seed = 1
  rl.train_and_evaluate(fresh, task=fake_task())
  (archived,) = os.listdir(tmp_path / "previous")
  assert "metrics.jsonl" in os.listdir(tmp_path / "previous" / archived)


def test_summary_and_eval_before_training(tmp_path, compile_cache, lad_run):
  config, _, _ = lad_run
  text = report.summary(config, wall_s=90.0)
  lines = text.splitlines()
  assert "2 step(s), 1.5 min" in lines[0]
  assert lines[1].split()[:4] == ["step", "reward", "acc", "len"] and "entropy" in lines[1]
  assert [ln.split()[0] for ln in lines[2:4]] == ["1", "2"]
  assert "eval after step 2: fake/avg@4=" in text and config.workdir in lines[-1]
  # train.num_steps=0 with eval.before_train only evaluates the initial model, as step 0.
  only_eval = tiny_config(tmp_path, "lad", compile_cache_dir=compile_cache)
  only_eval.train.num_steps = 0
  only_eval.eval.before_train = True
  for _ in range(2):  # without a checkpoint the second run starts over: one step-0 row
    _, last = rl.train_and_evaluate(only_eval, task=fake_task())
  rows = metrics_lib.read_jsonl(os.path.join(only_eval.workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [0] and "val-core/fake/acc/mean@4" in last
  assert "eval before training: fake/avg@4=" in report.summary(only_eval)


def test_prompt_encoder_few_shot_turns(tmp_path):
  from lad_jax.data import prompts  # pylint: disable=g-import-not-at-top
  config = tiny_config(tmp_path, "lad")
  config.data.few_shot = (("1 + 1 =", "<answer>2</answer>"),)
  tok = CharTokenizer()
  ids = tasks.make_encoder(tok, fake_task(), config)({"question": "2 + 5 ="})
  text = tok.decode(ids)
  # Raw-text path (no chat template): the example, then the question, same template.
  assert text == (prompts.format_prompt("1 + 1 =", template="procedural")
                  + "\n<answer>2</answer>\n\n"
                  + prompts.format_prompt("2 + 5 =", template="procedural"))
  messages = prompts.chat_messages("2 + 5 =", template="procedural", system_prompt="S",
                                   examples=config.data.few_shot)
  assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
  assert messages[2]["content"] == "<answer>2</answer>"
  assert messages[1]["content"] == prompts.format_prompt("1 + 1 =", template="procedural")


def test_real_verifier_with_dynamic_sampling(tmp_path, compile_cache):
  # reasoning-gym chain_sum scored by ProceduralVerifier; a random model never answers, so every
  # group has zero variance: dynamic sampling regenerates, then fills with dropped groups.
  config = tiny_config(tmp_path, "lad", compile_cache_dir=compile_cache)
  config.dynamic_sampling.enabled = True
  config.dynamic_sampling.max_gen_batches = 2
  config.train.num_steps = 1
  config.eval.every = 0
  _, last = rl.train_and_evaluate(config)
  assert last["train/num_gen_batches"] == 2
  assert last["batch/filled_zero_variance_groups"] == 4
  assert last["critic/rewards/mean"] == 0.0 and last["batch/zero_variance_frac"] == 1.0
  assert last["data/position"] == 8  # two rounds of 4 prompts consumed
