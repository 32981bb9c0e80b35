"""Config files and config validation of the RL loop (configs/*.py, lad_jax/config_utils.py)."""

from __future__ import annotations

import glob
import importlib.util
import inspect
import os
import subprocess
import sys

import pytest

from lad_jax import config_utils
from lad_jax import objectives

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
PAPER_CONFIGS = ("qwen7b", "deepseek7b_code", "nemotron1p5b", "deepscaler1p5b")


def load_config(name: str, arg=None):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_every_expected_config_exists():
  names = {os.path.basename(p)[:-3] for p in CONFIG_FILES}
  assert set(PAPER_CONFIGS) | {"smollm2_135m", "tiny"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.basename(p))
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_config_loads_and_validates(path, arg):
  name = os.path.basename(path)[:-3]
  config = load_config(name, arg)
  config_utils.validate(config)
  # The docstring holds the command that runs it.
  module_doc = open(path, encoding="utf-8").read()
  assert "experiments/math_rl.py" in module_doc
  if arg == "smoke":
    # CPU-sized: a 135M (or tiny random) model, a handful of short rollouts.
    assert config.model.source in ("gguf", "random")
    assert config.train.prompts_per_step * config.sampling.group_size <= 16
    assert config.sampling.max_new_tokens <= 64
    assert config.train.num_steps <= 3


def test_smoke_keeps_the_pipeline():
  full, small = load_config("qwen7b"), load_config("qwen7b", "smoke")
  for key in ("data.task", "data.train", "data.eval", "data.template", "verifier.reward",
              "loss.name", "dynamic_sampling.enabled"):
    a, b = full, small
    for part in key.split("."):
      a, b = a[part], b[part]
    assert a == b, key
  assert small.model.source == "gguf" and small.model.path is None


def test_qwen7b_is_the_paper_setting():
  # LAD paper App. C.2 ("Math reasoning") and shared/reference/baselines.md §3 (clip-higher).
  c = load_config("qwen7b")
  assert (c.train.prompts_per_step, c.sampling.group_size) == (256, 8)
  assert c.sampling.max_new_tokens == 8192 and c.sampling.temperature == 1.0
  assert c.optim.lr == 1e-6 and c.train.mini_batches == 8
  assert c.loss.name == "lad" and c.loss.hparams.lad.divergence == "js"
  assert c.loss.hparams.lad.eta == 0.25
  assert c.dynamic_sampling.enabled
  assert c.loss.hparams.grpo.eps_high == 0.28 and c.loss.hparams.clip_cov.eps_high == 1.0
  assert config_utils.eval_sets(c) == ["math500", "aime2024", "aime2025", "amc",
                                       "olympiadbench", "minerva"]
  # "For the two 1.5B models, we change the max lengths to 4096" (App. C.2).
  for name in ("nemotron1p5b", "deepscaler1p5b"):
    assert load_config(name).sampling.max_new_tokens == 4096
  code = load_config("deepseek7b_code")  # "The batch size is set to 64 ... learning rate 1e-6"
  assert code.train.prompts_per_step == 64 and code.optim.lr == 1e-6


def test_loss_hparams_cover_every_objective_signature():
  c = config_utils.base_config()
  for name in objectives.names():
    fn = objectives.get(name).spec.fn
    params = {p for p, v in inspect.signature(fn).parameters.items()
              if v.kind == inspect.Parameter.KEYWORD_ONLY and p != "key"}
    assert set(c.loss.hparams[name].keys()) == params, name


def test_loss_hparams_carry_the_entries_defaults():
  # dapo is grpo with its registry entry's defaults (DAPO: clip-higher 0.28, dual clip 10).
  c = config_utils.base_config()
  assert c.loss.hparams.dapo.eps_high == 0.28 and c.loss.hparams.dapo.clip_ratio_c == 10.0
  assert c.loss.hparams.grpo.eps_high == 0.2 and c.loss.hparams.grpo.clip_ratio_c == 3.0
  assert c.loss.hparams.dapo.eps_low == c.loss.hparams.grpo.eps_low == 0.2
  for name in objectives.names():
    if name != "lad":  # base_config sets the paper's lad divergence and eta
      assert dict(c.loss.hparams[name]) == objectives.SPECS[name].default_hparams(), name


@pytest.mark.parametrize("name", [n for n in objectives.names() if n != "lad_theoretical"])
def test_every_objective_can_be_selected(name):
  c = load_config("tiny")
  c.loss.name = name
  config_utils.validate(c)


def _add_key(node, key, value):
  with node.unlocked():
    setattr(node, key, value)


@pytest.mark.parametrize("config_name, change, match", [
    ("tiny", lambda c: setattr(c.loss, "name", "lad_theoretical"), "use 'lad'"),
    ("tiny", lambda c: setattr(c.loss, "name", "lad_js"), "valid objectives: .*grpo.*lad"),
    # A key added past the lock (a config built otherwise) is still caught by validate.
    ("tiny", lambda c: _add_key(c.optim, "lrr", 1e-3), r"optim\.lrr.*optim\.lr"),
    ("tiny", lambda c: setattr(c.train, "mini_batches", 3), "not divisible"),
    ("tiny", lambda c: setattr(c.eval, "pass_k", (1, 8)), "pass_k"),
    ("tiny", lambda c: setattr(c.data, "train", "sudoku"), "Unknown procedural task"),
    ("tiny", lambda c: setattr(c.model, "source", "onnx"), "model.source"),
    ("tiny", lambda c: setattr(c.loss.hparams.lad, "divergence", "chi2"), "chi2"),
    ("tiny", lambda c: setattr(c.verifier, "extract", "number"), "verifier.extract"),
    ("tiny", lambda c: setattr(c.data, "few_shot", (("q",),)), "few_shot"),
    ("tiny", lambda c: setattr(c.train, "num_steps", 0), "before_train"),
    # The lenient extractor is for procedural tasks only (qwen7b scores math answers).
    ("qwen7b", lambda c: setattr(c.verifier, "extract", "tag_or_last_number"),
     "procedural tasks only"),
])
def test_bad_values_are_rejected(config_name, change, match):
  c = load_config(config_name)
  change(c)
  with pytest.raises(config_utils.ConfigError, match=match):
    config_utils.validate(c)


def test_default_config_prompt_and_reward():
  # The README main job: one worked example and the lenient extractor (see its docstring).
  c = load_config("smollm2_135m")
  assert c.verifier.extract == "tag_or_last_number" and len(c.data.few_shot) == 1
  assert "<answer>" in c.data.few_shot[0][1]


def test_missing_model_and_data_are_named(tmp_path):
  c = load_config("qwen7b")
  c.model.path = str(tmp_path / "no_model")
  c.data.source_dir = str(tmp_path)
  with pytest.raises(config_utils.ConfigError) as e:
    config_utils.check_files(c)
  msg = str(e.value)
  assert str(tmp_path / "no_model") in msg and "config.json" in msg
  assert str(tmp_path / "dapo_math_17k.jsonl") in msg and "math500.jsonl" in msg


def _run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "math_rl.py"),
                         *args], capture_output=True, text=True, timeout=120, env=env,
                        cwd=ROOT, check=False)


@pytest.mark.parametrize("args, expected", [
    (("--config=configs/tiny.py", "--config.loss.name=nope"), "valid objectives"),
    (("--config=configs/tiny.py", "--config.optim.lrr=1"), 'Did you mean "lr"'),
    (("--config=configs/qwen7b.py", "--config.model.path=/nonexistent/qwen"),
     "/nonexistent/qwen"),
], ids=["unknown_objective", "typo_key", "missing_model"])
def test_cli_errors_exit_nonzero(args, expected):
  result = _run_cli(*args)
  assert result.returncode != 0
  assert expected in result.stderr, result.stderr[-2000:]


def _set(c, key, value):
  *parents, last = key.split(".")
  for part in parents:
    c = c[part]
  c[last] = value


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("key, value, match", [
    ("optim.lr", NAN, r"config\.optim\.lr=nan .*finite number >= 0"),
    ("optim.lr", INF, r"config\.optim\.lr=inf .*finite"),
    ("optim.lr", -1e-3, r"config\.optim\.lr=-0\.001 .*>= 0"),
    ("optim.b1", -0.1, r"config\.optim\.b1=-0\.1 .*\[0, 1\)"),
    ("optim.b2", 1.5, r"config\.optim\.b2=1\.5 .*\[0, 1\)"),
    ("optim.b2", 1.0, r"config\.optim\.b2=1\.0 .*\[0, 1\)"),
    ("optim.eps", 0.0, r"config\.optim\.eps=0\.0 .*> 0"),
    ("optim.grad_clip", -1.0, r"config\.optim\.grad_clip=-1\.0 .*None \(no clipping\)"),
    ("optim.grad_clip", NAN, r"config\.optim\.grad_clip=nan"),
    ("optim.weight_decay", -0.1, r"config\.optim\.weight_decay=-0\.1 .*>= 0"),
    ("optim.warmup_steps", -3, r"config\.optim\.warmup_steps=-3 .*integer >= 0"),
    ("sampling.temperature", NAN, r"config\.sampling\.temperature=nan .*> 0"),
    ("sampling.temperature", 0.0, r"config\.sampling\.temperature=0\.0 .*> 0"),
    ("sampling.top_p", NAN, r"config\.sampling\.top_p=nan .*\(0, 1\]"),
    ("sampling.group_size", 1, r"config\.sampling\.group_size=1 .*>= 2.*baseline"),
    ("sampling.max_new_tokens", 0, r"config\.sampling\.max_new_tokens=0 .*>= 1"),
    ("sampling.prompt_buckets", (64,), r"prompt_buckets=\(64,\).*max_prompt_tokens=256"),
    ("sampling.prompt_buckets", (0, 256), r"prompt_buckets=\(0, 256\).*integers >= 1"),
    ("eval.temperature", NAN, r"config\.eval\.temperature=nan .*> 0"),
    ("eval.top_p", 0.0, r"config\.eval\.top_p=0\.0 .*\(0, 1\]"),
    ("eval.top_p", 1.5, r"config\.eval\.top_p=1\.5 .*\(0, 1\]"),
    ("eval.pass_k", (1, True), r"config\.eval\.pass_k=.*integer >= 1"),
    ("verifier.timeout_s", 0.0, r"config\.verifier\.timeout_s=0\.0 .*> 0"),
    ("verifier.timeout_s", NAN, r"config\.verifier\.timeout_s=nan"),
    ("checkpoint.max_to_keep", 0, r"config\.checkpoint\.max_to_keep=0 .*integer >= 1"),
    ("checkpoint.every", -1, r"config\.checkpoint\.every=-1 .*>= 0"),
    ("mesh.data", 0, r"config\.mesh\.data=0 .*>= 1 or -1"),
    ("mesh.tensor", -2, r"config\.mesh\.tensor=-2"),
    ("train.num_steps", True, r"config\.train\.num_steps=True .*integer"),
    ("loss.hparams.lad.eta", NAN, r"config\.loss\.hparams\.lad\.eta=nan .*> 0"),
    ("loss.hparams.lad.eta", 0.0, r"config\.loss\.hparams\.lad\.eta=0\.0 .*> 0"),
    ("loss.hparams.lad.eta", -1.0, r"lad\.eta=-1\.0"),
    ("loss.hparams.lad.clip_adv", 0.0, r"lad\.clip_adv=0\.0 .*> 0"),
    ("advantage.hparams.grpo.eps", NAN, r"config\.advantage\.hparams\.grpo\.eps=nan"),
    ("advantage.hparams.alpha_dpg.alpha", 1.5, r"alpha_dpg\.alpha=1\.5 .*\[0, 1\]"),
])
def test_bad_numbers_are_rejected_in_one_line(key, value, match):
  c = load_config("tiny")
  with c.ignore_type():
    _set(c, key, value)
  with pytest.raises(config_utils.ConfigError, match=match) as e:
    config_utils.validate(c)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("objective, key, value, match", [
    ("grpo", "eps_low", -5.0, r"grpo\.eps_low=-5\.0 .*\[0, 1\]"),
    ("grpo", "eps_high", NAN, r"grpo\.eps_high=nan"),
    ("grpo", "kl_coef", -1.0, r"grpo\.kl_coef=-1\.0 .*>= 0"),
    ("grpo", "clip_ratio_c", 1.0, r"grpo\.clip_ratio_c=1\.0 .*None \(no dual clip\).*> 1"),
    ("grpo", "log_ratio_clip", 0.0, r"grpo\.log_ratio_clip=0\.0 .*> 0"),
    ("dapo", "eps_high", -0.1, r"dapo\.eps_high=-0\.1"),
    ("entadv", "kappa", 0.5, r"entadv\.kappa=0\.5 .*>= 1"),
    ("entadv", "alpha", -0.4, r"entadv\.alpha=-0\.4 .*>= 0"),
    ("flowrl", "beta", 0.0, r"flowrl\.beta=0\.0 .*> 0"),
    ("flowrl", "max_weight", -1.0, r"flowrl\.max_weight=-1\.0 .*None \(no cap\)"),
    ("kl_cov", "k_ratio", 0.0, r"kl_cov\.k_ratio=0\.0 .*\(0, 1\]"),
    ("clip_cov", "clip_cov_ratio", 2.0, r"clip_cov\.clip_cov_ratio=2\.0"),
    ("clip_cov", "clip_cov_lb", 9.0, r"clip_cov_lb=9\.0 must be below clip_cov_ub=5\.0"),
    ("grpo", "kl_estimator", "k4", r"grpo\.kl_estimator='k4' is not valid.*'k3'"),
])
def test_bad_objective_hparams_are_rejected(objective, key, value, match):
  c = load_config("tiny")
  c.loss.name = objective
  c.loss.hparams[objective][key] = value
  with pytest.raises(config_utils.ConfigError, match=match):
    config_utils.validate(c)


def test_off_values_and_edges_are_accepted():
  c = load_config("tiny")
  c.optim.grad_clip = None  # no clipping
  c.optim.lr = 0.0
  c.optim.b1 = 0.0
  c.mesh.data, c.mesh.fsdp = -1, 1
  c.loss.name = "grpo"
  c.loss.hparams.grpo.clip_ratio_c = None  # no dual clip
  config_utils.validate(c)
  c.optim.grad_clip = 0.0  # also off (train.make_optimizer)
  config_utils.validate(c)


def test_range_describes_itself():
  assert config_utils.MOMENTUM.describe() == "a finite number in [0, 1)"
  assert config_utils.PROBABILITY.describe() == "a finite number in (0, 1]"
  assert not config_utils.POSITIVE.contains(float("nan"))
  assert not config_utils.COUNT.contains(True) and config_utils.COUNT.contains(3)
  assert config_utils.MESH_AXIS.contains(-1) and not config_utils.MESH_AXIS.contains(-2)


def _load_file(path, arg=None):
  spec = importlib.util.spec_from_file_location("config_under_test", str(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


TYPO_CONFIG = '''"""A config with a misspelt key (experiments/math_rl.py)."""
from lad_jax import config_utils


def get_config(arg=None):
  c = config_utils.base_config()
  c.optim.{key} = 1e-3
  return config_utils.finalize(c, arg)
'''


def test_base_config_is_locked_except_the_free_form_fields():
  c = config_utils.base_config()
  assert c.is_locked and c.optim.is_locked and c.loss.hparams.lad.is_locked
  with pytest.raises(AttributeError, match='Did you mean "lr"'):
    c.optim.lrr = 1e-3
  with pytest.raises(AttributeError, match='Did you mean "eta"'):
    c.loss.hparams.lad.etaa = 0.5
  c.optim.lr = 1e-3  # existing keys stay settable
  c.loss.hparams.lad.eta = 0.5
  c.data.difficulty.min_terms = 2  # FREE_FORM: forwarded as **kwargs
  c.model.random.vocab_size = 8
  c.model.random = dict(vocab_size=16)  # or replaced whole, as configs/tiny.py does
  assert (c.data.difficulty.min_terms, c.model.random.vocab_size) == (2, 16)
  assert not c.log.wandb and c.log.wandb_project == "lad-jax"
  assert c.log.wandb_run is None and c.log.wandb_mode is None


def test_misspelt_key_in_a_config_file_fails_at_load(tmp_path):
  path = tmp_path / "typo.py"
  path.write_text(TYPO_CONFIG.format(key="lrr"))
  with pytest.raises(AttributeError, match=r'"lrr".*Did you mean "lr"'):
    _load_file(path)
  path.write_text(TYPO_CONFIG.format(key="lr"))
  assert _load_file(path).optim.lr == 1e-3
  # The entry point: one line on stderr, exit status 2.
  path.write_text(TYPO_CONFIG.format(key="lrr"))
  result = _run_cli(f"--config={path}")
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and 'Did you mean "lr"' in lines[0], result.stderr[-2000:]
  assert f"--config={path}: unknown config key 'lrr'." in lines[0], lines[0]
