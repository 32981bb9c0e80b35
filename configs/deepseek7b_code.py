"""The paper's code setting (App. C.2): DeepSeek-R1-Distill-Qwen-7B on DeepCoder, LAD-JS.

The paper gives batch 64 prompts, lr 1e-6 and LAD with Jensen-Shannon; the rest (eta 0.25, 8
samples, responses up to 8192 tokens, mini-batches of 16 prompts) follows the math runs. Training problems are stdin/stdout
programs scored in the sandbox (`lad_jax.verifiers.CodeVerifier`); evaluation here is HumanEval
(the package ships it). LiveCodeBench / CodeForces are not wired up.

Put DeepCoder's problems as <source_dir>/deepcoder.jsonl, one {"problem", "tests": [{"input",
"output"}, ...]} object per line:

  python experiments/math_rl.py --config=configs/deepseek7b_code.py \
      --config.model.path=~/models/DeepSeek-R1-Distill-Qwen-7B --config.data.source_dir=~/lad_sources
"""

from __future__ import annotations

from lad_jax import config_presets
from lad_jax import config_utils


def get_config(arg=None):
  c = config_utils.base_config()
  c.name = "deepseek7b_code_lad"
  c.model.source = "hf"
  c.model.path = "~/models/DeepSeek-R1-Distill-Qwen-7B"
  c.model.param_dtype = "bfloat16"
  c.model.dtype = "bfloat16"
  c.model.remat_policy = "full"
  c.data.task = "code"
  c.data.train = "deepcoder"
  c.data.eval = "humaneval"
  c.data.source_dir = "~/lad_sources"
  c.data.template = "code"
  c.data.max_prompt_tokens = 2048
  c.verifier.workers = 16
  c.verifier.timeout_s = 10.0
  c.sampling.group_size = 8
  c.sampling.max_new_tokens = 8192
  c.sampling.temperature = 1.0
  c.sampling.prompt_buckets = (512, 1024, 2048)
  c = config_presets.seven_b_layout(c)  # tensor 2 x fsdp 4, 128 rows per sampler call
  c.train.prompts_per_step = 64
  c.train.mini_batches = 4
  c.train.micro_batches = 16
  c.train.chunk_size = 1024
  c.train.num_steps = 300
  c.optim.lr = 1e-6
  c.loss.name = "lad"
  c.loss.hparams.lad.divergence = "js"
  c.loss.hparams.lad.eta = 0.25
  c.eval.every = 10
  c.eval.num_prompts = 164
  c.eval.samples = 8
  c.eval.pass_k = (1, 8)
  c.checkpoint.every = 10
  return config_utils.finalize(c, arg)
