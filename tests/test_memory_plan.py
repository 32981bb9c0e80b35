"""memory_plan: a reduced-depth, reduced-length qwen7b step on the 8 simulated CPU devices
(conftest), the published shapes, and the runtime.memory_fraction key."""

import importlib.util
import os
import re

import pytest

from lad_jax import config_utils
from lad_jax import memory_plan
from lad_jax import rl
from lad_jax.models import shapes
from lad_jax.models.config import ModelConfig
from lad_jax.models.params import abstract_params, count_params

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _paper_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(_ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _small_qwen7b():
  """configs/qwen7b.py with its published 7B widths, 1 layer, short sequences, 16 prompts."""
  c = _paper_config("qwen7b")
  c.model.path = "/nonexistent/Qwen2.5-7B"  # the built-in shape, even where the model exists
  c.data.max_prompt_tokens = 64
  c.sampling.prompt_buckets = (64,)
  c.sampling.max_new_tokens = 64
  c.sampling.rows_per_call = 64
  c.sampling.decode_slots = 64  # continuous batching, as configs/qwen7b.py
  c.train.prompts_per_step = 16
  c.train.mini_batches = 2
  c.train.micro_batches = 2
  return c


@pytest.fixture(scope="module")
def plan():
  return memory_plan.build_plan(_small_qwen7b(), device_memory_gb=80, num_layers=1)


def _analytic_bytes(cfg: ModelConfig, devices: int, tensor: int = 2) -> tuple[int, int]:
  """(elements of the matrices, of the vectors) per device of a Qwen2 decoder on configs/qwen7b's
  mesh (tensor 2 x fsdp 4): every matrix is split over all `devices` (fsdp over D = 3584, tensor
  over heads / F / V); the norms are replicated, the q/k/v biases split over `tensor` with their
  heads. Counts from the architecture (embedding V x D, untied head D x V, per layer q D x N*H,
  k and v D x K*H, o N*H x D, gate / up D x F, down F x D)."""
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  n, k, v, layers = cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size, cfg.num_layers
  matrices = 2 * v * d + layers * (2 * d * n * h + 2 * d * k * h + 3 * d * f)
  small = d + layers * 2 * d + layers * (n * h + 2 * k * h) // tensor
  return matrices // devices, small


def test_every_program_is_measured(plan):
  assert [p.name for p in plan.programs] == ["prefill", "decode", "score_logp", "train_step"]
  for p in plan.programs:
    assert p.arguments > 0 and p.outputs > 0 and p.temps > 0, p
    assert p.device_peak >= p.peak >= p.arguments
  # The train step writes the donated state in place: at least the parameters and moments alias.
  step = plan.programs[-1]
  assert step.alias >= plan.resident.params + plan.resident.master + plan.resident.moments - 2**20


def test_resident_state_is_the_analytic_bytes_per_device(plan):
  assert plan.num_devices == 8 and plan.model_cfg.num_layers == 1
  sharded, replicated = _analytic_bytes(plan.model_cfg, 8)
  r = plan.resident
  assert r.params == 2 * (sharded + replicated)  # bf16
  assert r.master == 4 * (sharded + replicated)  # fp32 master copy
  assert r.grad_accum == r.master
  assert 0 <= r.moments - 2 * r.master < 4096  # mu, nu (+ a few replicated scalars)
  assert r.ref_params == 0  # LAD needs no reference model
  # The cache (decoder.KVCache): 64 rows x 128 slots x K=4 kv heads x H=128 x (k, v) bf16, rows
  # over fsdp 4 and heads over tensor 2; int32 segment ids per slot and next position per row,
  # rows over fsdp 4; one int32 index.
  assert r.kv_cache == (64 * 128 * 4 * 128 * 2 * 2) // 8 + (64 * 128 * 4 + 64 * 4) // 4 + 4


def test_report_table_and_last_line(plan):
  text = memory_plan.report(plan)
  lines = text.splitlines()
  for name in ("prefill", "decode", "score_logp", "train_step"):
    assert any(line.startswith(name) for line in lines), text
  assert re.fullmatch(r"fits=True worst=\w+ peak_gib=[\d.]+ budget_gib=72\.00", lines[-1]), text
  # Resident state at the published 28 layers (given when the depth was cut): bf16 params, fp32
  # master copy and two fp32 moments = 14 bytes per parameter.
  sharded, replicated = _analytic_bytes(plan.model_cfg.replace(num_layers=28), 8)
  assert 0 <= plan.full_depth_resident - 14 * (sharded + replicated) < 4096


def test_over_budget_names_the_knob(plan):
  tight = memory_plan.Plan(**{**plan.__dict__, "budget": plan.programs[-1].device_peak - 1})
  lines = memory_plan.advice(tight)
  assert any(line.startswith("over_budget=train_step") and "train.micro_batches=" in line
             for line in lines), lines
  assert memory_plan.report(tight).splitlines()[-1].startswith("fits=False")


@pytest.mark.parametrize("name, billions", [
    # Hugging Face model cards: Qwen2.5-7B "7.61B", Qwen2.5-1.5B "1.54B",
    # DeepSeek-R1-Distill-Qwen-1.5B "1.78B" (Qwen2.5-Math-1.5B with an untied LM head).
    ("qwen2.5-7b", 7.61), ("qwen2.5-1.5b", 1.54), ("deepseek-r1-distill-qwen-1.5b", 1.78)])
def test_published_shapes_have_the_published_sizes(name, billions):
  cfg = ModelConfig.from_hf(shapes.get(name))
  assert count_params(abstract_params(cfg)[0]) / 1e9 == pytest.approx(billions, abs=0.006)


def test_shape_from_checkpoint_name():
  assert shapes.infer("~/models/Qwen2.5-7B") == "qwen2.5-7b"
  assert shapes.infer("~/models/Thinkless-DeepScaleR-1.5B") == "deepseek-r1-distill-qwen-1.5b"
  assert shapes.infer("~/models/unknown") is None
  with pytest.raises(config_utils.ConfigError, match="Unknown model shape"):
    shapes.get("gpt-2")


def test_memory_fraction_is_validated_and_exported(monkeypatch):
  c = config_utils.base_config()
  for bad in (0.0, 1.5, float("nan")):
    c.runtime.memory_fraction = bad
    with pytest.raises(config_utils.ConfigError, match="runtime.memory_fraction"):
      config_utils.check_numbers(c)
  c.runtime.memory_fraction = 0.75
  monkeypatch.delenv(rl.MEM_FRACTION_ENV, raising=False)
  rl.export_memory_fraction(c)
  assert os.environ[rl.MEM_FRACTION_ENV] == "0.75"
  assert rl.memory_fraction(c) == 0.75
  monkeypatch.setenv(rl.MEM_FRACTION_ENV, ".5")  # the user's own value wins
  rl.export_memory_fraction(c)
  assert os.environ[rl.MEM_FRACTION_ENV] == ".5" and rl.memory_fraction(c) == 0.5
