"""Wall time of the bandit sweep, and one LAD-JS run in JAX vs a plain PyTorch eager loop.

  python benchmarks/bandit_speed.py [--steps 4000] [--seeds 5] [--skip_sweep]

1. The default sweep of `experiments/bandit.py` (every method, both modes, 5 seeds, figures and
   tables written to a temporary directory), compile included.
2. The paper's setting for one method and one seed (LAD-JS, sampled mode: 32 arms per step from
   pi_old at T = 1.5, Adam lr 5e-3, 4000 steps, pi_old refreshed twice): our `lax.scan` run
   (compile included, and the run alone) against the same loop written in eager PyTorch (CPU, the
   closed-form JS loss of Table 5 on the sampled arms, torch.optim.Adam). Both final policies are
   scored by TV(P_pi, P_A) as a sanity check that they solve the same problem.

Last line: `jax_over_torch_speedup=<torch wall time / JAX wall time incl. compile>`.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import numpy as np
import torch

from lad_jax import bandit


def torch_lad_js(config: bandit.BanditConfig, *, eta: float = 1.0, seed: int = 0) -> np.ndarray:
  """The bandit loop in eager PyTorch; returns the final (logits, old_logits) as numpy."""
  gen = torch.Generator().manual_seed(seed)
  rewards = torch.tensor(np.array(bandit.reward_vector(config.num_arms)), dtype=torch.float32)
  logits = torch.zeros(config.num_arms, requires_grad=True)
  old_logits = torch.zeros(config.num_arms)
  optimizer = torch.optim.Adam([logits], lr=config.lr)
  refresh = bandit.refresh_schedule(config.steps, config.refreshes)
  log2 = math.log(2.0)
  for step in range(config.steps):
    if refresh[step]:
      old_logits = logits.detach().clone()
    probs = torch.softmax(old_logits / config.temperature, dim=0)
    arms = torch.multinomial(probs, config.batch_size, replacement=True, generator=gen)
    reward = rewards[arms]
    u = (reward - reward.mean()) / eta
    logp = torch.log_softmax(logits, dim=0)[arms]
    old_logp = torch.log_softmax(old_logits, dim=0)[arms]
    l = logp - old_logp
    r = torch.exp(l)
    # e^u f(x) for JS, f(x) = 1/2 (x log x - (x + 1) log((x + 1) / 2)), x = r e^-u (Table 5).
    loss = (0.5 * (r * (l - u) - (r + torch.exp(u)) * (torch.nn.functional.softplus(l - u) - log2))
            ).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
  return logits.detach().numpy(), old_logits.numpy()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=4000)
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--skip_sweep", action="store_true")
  args = parser.parse_args()
  config = bandit.BanditConfig(steps=args.steps)
  rewards = np.asarray(bandit.reward_vector())
  p_a = bandit.target_distribution(rewards, 1.0)

  if not args.skip_sweep:
    with tempfile.TemporaryDirectory() as out:
      start, cpu_start = time.perf_counter(), time.process_time()
      bandit.main(config, num_seeds=args.seeds, out_dir=out, command="benchmarks/bandit_speed.py")
      sweep_s, sweep_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(f"default sweep ({len(bandit.DEFAULT_METHODS)} methods x {len(bandit.MODES)} modes x "
          f"{args.seeds} seeds x {args.steps} steps, figures included): {sweep_s:.1f} s wall, "
          f"{sweep_cpu:.1f} s CPU (all threads)")

  start, cpu_start = time.perf_counter(), time.process_time()
  result = bandit.run_method("lad_js", "sampled", config, seeds=[0], etas=[1.0])
  jax_s, jax_cpu = time.perf_counter() - start, time.process_time() - cpu_start
  final = result.trajectory
  jax_tv = bandit.total_variation(
      bandit.policy_induced(final.logits[0, 0, -1], final.old_logits[0, 0, -1]), p_a)
  start, cpu_start = time.perf_counter(), time.process_time()
  logits, old_logits = torch_lad_js(config)
  torch_s, torch_cpu = time.perf_counter() - start, time.process_time() - cpu_start
  torch_tv = bandit.total_variation(bandit.policy_induced(logits, old_logits), p_a)
  print(f"LAD-JS, sampled, 1 seed, {args.steps} steps:")
  print(f"  jax   : {jax_s:.2f} s wall ({jax_cpu:.2f} s CPU) incl. tracing and compile "
        f"(compile {result.compile_s:.2f} s, run {result.run_s:.3f} s); "
        f"final TV(P_pi, P_A) = {jax_tv:.3f}")
  print(f"  torch : {torch_s:.2f} s wall ({torch_cpu:.2f} s CPU) eager, "
        f"{torch.get_num_threads()} threads; final TV(P_pi, P_A) = {torch_tv:.3f}")
  print(f"  run-only speedup (excluding JAX compile): {torch_s / result.run_s:.1f}x")
  print(f"jax_over_torch_speedup={torch_s / jax_s:.2f}")


if __name__ == "__main__":
  main()
