"""A run's policy after training: load it from a checkpoint, evaluate it, export it to HF.

  config, model_cfg, params, step = policy.load_policy("/tmp/lad_runs/tiny")   # newest intact
  scores = policy.evaluate_policy(config, params, model_cfg)    # the loop's held-out evaluation
  policy.write_results(out_dir, config=config, source={...}, scores=scores)  # results.json / .md
  policy.export_hf(params, model_cfg, tokenizer=tok, out_dir=d)  # transformers loads d

`load_policy` rebuilds only the *abstract* train state of the run's saved config (shapes, dtypes,
shardings, by `jax.eval_shape`: nothing allocated or compiled; no task, verifier or sampler), so
orbax restores each array straight into its shards, and the checkpoint's fingerprint is verified
as on resume.
`evaluate_policy` builds the loop's own components (mesh, tokenizer, task, sampler) and calls
`evaluate.evaluate` with the loop's settings and evaluation key, so its numbers are the loop's.
The command lines are experiments/evaluate.py and experiments/export_hf.py.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from lad_jax import checkpoint as checkpoint_lib
from lad_jax import components
from lad_jax import config_utils
from lad_jax import evaluate as evaluate_lib
from lad_jax import report
from lad_jax import run_dir
from lad_jax import tasks as tasks_lib
from lad_jax import train as train_lib
from lad_jax.errors import ConfigError

CHECKPOINTS_DIR = "checkpoints"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


# ------------------------------------------------------------------------------------------------
# Loading a checkpoint
# ------------------------------------------------------------------------------------------------


def parse_checkpoint_path(path: str) -> tuple[str, Optional[int]]:
  """(workdir, step) of `<workdir>` (newest step) or `<workdir>/checkpoints/<step>`."""
  path = os.path.abspath(os.path.expanduser(os.fspath(path))).rstrip(os.sep)
  head, tail = os.path.split(path)
  if tail.isdigit() and os.path.basename(head) == CHECKPOINTS_DIR:
    return os.path.dirname(head), int(tail)
  if tail == CHECKPOINTS_DIR:
    return head, None
  return path, None


def run_config(workdir: str) -> Any:
  """The run's saved config.json as a full ConfigDict (base_config updated with it).

  Raises:
    FileNotFoundError: the workdir or its config.json does not exist.
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"Run directory {workdir!r} does not exist; pass the workdir of a "
                            "run (its config.workdir) or <workdir>/checkpoints/<step>.")
  saved = run_dir.load_saved_config(workdir)
  if saved is None:
    raise FileNotFoundError(
        f"{run_dir.config_path(workdir)} does not exist, so {workdir!r} is not the workdir of a "
        "run; pass --config=<the run's config file> as well.")
  config = config_utils.base_config()
  config.update(saved)
  return config


def model_config(config) -> Any:
  """The ModelConfig of config.model without reading any weights (the shapes to restore)."""
  from lad_jax import models  # pylint: disable=g-import-not-at-top
  overrides = components.model_overrides(config)
  src, path = config.model.source, config.model.path
  if src == "random":
    return models.ModelConfig(**dict(config.model.random), **overrides)
  if src == "hf":
    return models.ModelConfig.from_hf(os.path.expanduser(path), **overrides)
  return models.gguf_config(os.path.expanduser(path or models.find_smollm2_gguf()), **overrides)


def abstract_train_state(config, model_cfg, mesh) -> Any:
  """The loop's TrainState as ShapeDtypeStructs with their shardings, to restore into.

  The structure `train.create_train_state` gives the loop (optimizer state of config.optim, an
  fp32 master copy for low-precision parameters, FlowRL's log Z head), from `jax.eval_shape`
  alone: nothing is allocated or compiled. tests/test_policy.py restores states made by
  `create_train_state` into it, so the two cannot drift apart unnoticed.
  """
  from lad_jax import models  # pylint: disable=g-import-not-at-top
  from lad_jax import scoring  # pylint: disable=g-import-not-at-top
  objective, _ = components.make_objective(config)
  tx = components.make_optimizer(config)
  key = jax.random.key(0)  # only shapes are used

  def init(model_params):
    p = {"model": model_params}
    if objective.needs_log_z:
      p["logz_head"] = scoring.init_logz_head(key, model_cfg.hidden_size)
    opt_state = train_lib.init_opt_state(
        tx, p, master_weights=train_lib._is_low_precision(p))  # pylint: disable=protected-access
    return train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=opt_state,
                                key=jax.random.key_data(key))

  abstract = jax.eval_shape(init, models.abstract_params(model_cfg)[0])
  param_sh = {"model": models.param_shardings(model_cfg, mesh)}
  if objective.needs_log_z:
    replicated = NamedSharding(mesh, PartitionSpec())
    param_sh["logz_head"] = jax.tree.map(lambda _: replicated, abstract.params["logz_head"])
  shardings = train_lib._state_shardings(tx, abstract, param_sh, mesh)  # pylint: disable=protected-access
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _restore(directory: str, abstract: Any, step: Optional[int]) -> tuple[Any, int]:
  """(state, step): the given step, or the newest intact one (damaged ones are left in place)."""
  if not os.path.isdir(directory) or not any(n.isdigit() for n in os.listdir(directory)):
    raise FileNotFoundError(f"No checkpoint in {directory}: the run saved none yet (it saves "
                            "at checkpoint.every and at its last step).")
  ckpt = checkpoint_lib.Checkpointer(directory)
  try:
    if step is not None:
      if step not in ckpt.all_steps():
        raise FileNotFoundError(f"No checkpoint of step {step} in {directory}; there are steps "
                                f"{sorted(ckpt.all_steps())}.")
      state, _ = ckpt.restore(abstract, step)
      return state, step
    restored = ckpt.restore_latest_intact(abstract, quarantine=False)
    return restored.state, restored.step
  finally:
    ckpt.close()


def load_policy(workdir: str, *, step: Optional[int] = None, config: Any = None,
                mesh: Any = None) -> tuple[Any, Any, Any, int]:
  """The policy parameters a run checkpointed.

  Args:
    workdir: the run's workdir (holds config.json and checkpoints/).
    step: which checkpoint; None: the newest intact one.
    config: the run's config; None reads `<workdir>/config.json`. It must be the run's own
      (model, objective and optimizer decide the structure of the saved state).
    mesh: where the params go; None: config.mesh's.

  Returns:
    (config, model_cfg, params of the decoder in the mesh of config.mesh, step).

  Raises:
    FileNotFoundError: no such workdir, no config.json (and no `config`), no checkpoint.
    ConfigError: the saved config cannot be read or is invalid.
    checkpoint.CheckpointError: the checkpoint is damaged or holds another run's state.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  config = run_config(workdir) if config is None else config
  config_utils.validate(config)
  mesh = components.make_mesh(config) if mesh is None else mesh
  model_cfg = model_config(config)
  abstract = abstract_train_state(config, model_cfg, mesh)
  state, step = _restore(os.path.join(workdir, CHECKPOINTS_DIR), abstract, step)
  return config, model_cfg, state.params["model"], step


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def eval_key(config) -> jax.Array:
  """The key of every evaluation of the run (rl._loop's): fold_in(run key, EVAL_KEY)."""
  return jax.random.fold_in(jax.random.key(config.seed), components.EVAL_KEY)


def evaluate_policy(config, params: Any, model_cfg: Any, *, pass_k: Optional[Sequence[int]] = None,
                    tokenizer: Any = None, task: Optional[tasks_lib.Task] = None,
                    mesh: Any = None) -> dict[str, float]:
  """The RL loop's held-out evaluation of `params` (its sampler, settings and key).

  Args:
    config: the evaluation config (data, eval, sampling, seed, mesh).
    params: decoder parameters.
    model_cfg: their ModelConfig.
    pass_k: the k of Pass@k; None: config.eval.pass_k (as the loop).
    tokenizer: None builds config.tokenizer's.
    task: a prebuilt task (tests); None builds config.data's and closes it after.
    mesh: None builds config.mesh's.
  """
  mesh = components.make_mesh(config) if mesh is None else mesh
  tokenizer = components.load_tokenizer(config, model_cfg) if tokenizer is None else tokenizer
  own_task = task is None
  task = tasks_lib.build_task(config) if own_task else task
  try:
    if not task.evals:
      raise ConfigError("config.data.eval names no held-out set to evaluate on.")
    return evaluate_lib.evaluate(
        components.make_sampler(config, model_cfg, tokenizer, mesh), params, task, tokenizer,
        tasks_lib.make_encoder(tokenizer, task, config), eval_key(config),
        num_prompts=config.eval.num_prompts, settings=evaluate_lib.settings_from_config(config),
        pass_k=tuple(config.eval.pass_k if pass_k is None else pass_k))
  finally:
    if own_task:
      task.close()


def _with_run_model(config, run_cfg) -> Any:
  """`config` (evaluation settings) with the run's model, tokenizer and mesh: a checkpoint is
  evaluated as the model it is, whatever config.model says."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for section in ("model", "tokenizer", "mesh"):
      config[section] = run_cfg[section].copy_and_resolve_references()
  return config


def _load(config, checkpoint: Optional[str]) -> tuple[Any, Any, Any, dict[str, Any], str]:
  """(eval config, model_cfg, params, what they are, default output dir) for run_evaluation."""
  if checkpoint is None:
    config_utils.validate(config)
    config_utils.check_files(config)
    components.maybe_initialize_distributed(config)
    model_cfg, params = components.load_model(config, components.make_mesh(config))
    source = {"model": {"source": config.model.source, "path": config.model.path,
                        "seed": config.seed}}
    return config, model_cfg, params, source, os.path.join(report.workdir(config), "eval",
                                                           "initial")
  workdir, step = parse_checkpoint_path(checkpoint)
  run_cfg = run_config(workdir)
  config = run_cfg if config is None else _with_run_model(config, run_cfg)
  config_utils.validate(config)
  config_utils.check_files(config)
  components.maybe_initialize_distributed(config)
  _, model_cfg, params, step = load_policy(workdir, step=step, config=run_cfg,
                                           mesh=components.make_mesh(config))
  source = {"checkpoint": os.path.join(workdir, CHECKPOINTS_DIR, str(step)), "step": step}
  return config, model_cfg, params, source, os.path.join(workdir, "eval", f"step_{step}")


def run_evaluation(*, config: Any = None, checkpoint: Optional[str] = None,
                   out_dir: Optional[str] = None, task: Optional[tasks_lib.Task] = None
                   ) -> Optional[str]:
  """experiments/evaluate.py: evaluates a checkpoint (or config's initial model) with Pass@k
  for every k from 1 to eval.samples, writes results.json / results.md (process 0) and returns
  the markdown and where it went (None on other processes).

  Raises:
    ConfigError / FileNotFoundError: a bad config, workdir or checkpoint path (one line).
  """
  config, model_cfg, params, source, default_out = _load(config, checkpoint)
  scores = evaluate_policy(config, params, model_cfg, task=task,
                           pass_k=range(1, int(config.eval.samples) + 1))
  if jax.process_index() != 0:
    return None
  out_dir = os.path.abspath(os.path.expanduser(out_dir or default_out))
  json_path, md_path = write_results(out_dir, config=config, source=source, scores=scores)
  with open(md_path, encoding="utf-8") as f:
    text = f.read()
  return f"{text}\nwrote {json_path} and {md_path}"


_METRIC_ORDER = ("avg@", "pass@", "distinct_", "response_length")


def _metric_order(metric: str) -> tuple[int, list[Any]]:
  """avg@k, pass@1..k (numeric order), distinct-n, distinct correct, response length."""
  group = next((i for i, p in enumerate(_METRIC_ORDER) if metric.startswith(p)),
               len(_METRIC_ORDER))
  return group, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", metric)]


def results_markdown(scores: dict[str, float], *, title: str) -> str:
  """One markdown table (metric | value) per held-out set, in `_metric_order` (Avg@k is
  val-core's acc/mean@k)."""
  sets: dict[str, dict[str, float]] = {}
  for name, value in scores.items():  # val-core/<set>/acc/mean@k, val-aux/<set>/distinct_3
    parts = name.split("/", 2)
    if len(parts) == 3 and parts[0] in ("val-core", "val-aux"):
      metric = parts[2].replace("acc/mean@", "avg@").replace("acc/pass@", "pass@")
      sets.setdefault(parts[1], {})[metric] = value
  lines = [f"# {title}", ""]
  for set_name in sorted(sets):
    lines += [f"## {set_name}", "", "| metric | value |", "|---|---|"]
    for metric in sorted(sets[set_name], key=_metric_order):
      lines.append(f"| {metric} | {sets[set_name][metric]:.4f} |")
    lines.append("")
  return "\n".join(lines)


def write_results(out_dir: str, *, config, source: dict[str, Any],
                  scores: dict[str, float]) -> tuple[str, str]:
  """Writes out_dir/results.json (config name, what was evaluated, every metric) and
  out_dir/results.md; returns their paths. `source`: e.g. {"checkpoint": dir, "step": 3}."""
  os.makedirs(out_dir, exist_ok=True)
  e = config.eval
  record = {"config": config.name, **source,
            "eval": {"num_prompts": e.num_prompts, "samples": e.samples,
                     "temperature": e.temperature, "top_p": e.top_p,
                     "max_new_tokens": e.max_new_tokens or config.sampling.max_new_tokens,
                     "seed": config.seed},
            "metrics": {k: float(v) for k, v in sorted(scores.items())}}
  paths = (os.path.join(out_dir, RESULTS_JSON), os.path.join(out_dir, RESULTS_MD))
  with open(paths[0], "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
  if "checkpoint" in source:
    what = f"{source['checkpoint']} (step {source['step']})"
  else:
    m = source.get("model", {})
    what = f"initial model ({m.get('source')}: {m.get('path') or 'seed %s' % m.get('seed')})"
  with open(paths[1], "w", encoding="utf-8") as f:
    f.write(results_markdown(scores, title=f"{config.name}: {what}"))
  return paths


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------


class Exported(NamedTuple):
  """What `export_hf` wrote: the directory, its files, and a note if no tokenizer was saved."""

  directory: str
  files: list[str]
  note: Optional[str]


def export_hf(params: Any, model_cfg: Any, *, tokenizer: Any, out_dir: str,
              dtype: Any = None) -> Exported:
  """Writes a Hugging Face model directory that `AutoModelForCausalLM.from_pretrained` loads:
  config.json, safetensors (each parameter's dtype, or `dtype`), generation_config.json and the
  tokenizer's files. A tokenizer without `save_pretrained` (the byte-level CharTokenizer of random
  test models) has no HF form: weights and config only, said in `note`."""
  from lad_jax.models import weights  # pylint: disable=g-import-not-at-top
  hf_tokenizer = tokenizer if hasattr(tokenizer, "save_pretrained") else None
  weights.save_hf(params, model_cfg, out_dir, dtype=dtype, tokenizer=hf_tokenizer)
  if jax.process_index() == 0:
    _write_generation_config(model_cfg, out_dir)
  note = None
  if hf_tokenizer is None:
    note = (f"no tokenizer files: the run's {type(tokenizer).__name__} has no Hugging Face form "
            "(weights and config only)")
  files = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
  return Exported(out_dir, files, note)


def _write_generation_config(model_cfg: Any, out_dir: str) -> None:
  """generation_config.json with the model's special tokens (generate() stops at its EOS)."""
  hf = model_cfg.to_hf()
  gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}
  with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
    json.dump(gen, f, indent=2)


def export_run(workdir: str, *, step: Optional[int] = None, out_dir: str,
               dtype: Optional[str] = None) -> str:
  """experiments/export_hf.py: the run's checkpoint (newest intact, or `step`; `workdir` may
  also be <workdir>/checkpoints/<step>) as a Hugging Face directory. Returns what it wrote."""
  workdir, path_step = parse_checkpoint_path(workdir)
  config, model_cfg, params, step = load_policy(
      workdir, step=path_step if step is None else step)
  config_utils.check_files(config)  # the tokenizer (model.path) must still be there
  tokenizer = components.load_tokenizer(config, model_cfg)
  out = export_hf(params, model_cfg, tokenizer=tokenizer,
                  out_dir=os.path.abspath(os.path.expanduser(out_dir)), dtype=dtype)
  lines = [f"exported step {step} of {workdir} to {out.directory}: {', '.join(out.files)}"]
  if out.note:
    lines.append(f"note: {out.note}")
  return "\n".join(lines)
