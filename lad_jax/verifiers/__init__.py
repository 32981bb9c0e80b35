"""Verifiers: the reward of a response is what its verifier says.

- `MathVerifier`: final-answer extraction + math-verify equivalence in worker processes with
  per-item deadlines (`math.py`, `extraction.py`, `pool.py`).
- `CodeVerifier`: generated programs run against tests in a sandboxed subprocess (`code.py`,
  `sandbox.py`, `sandbox_harness.py`).
- `ProceduralVerifier`: reasoning-gym tasks scored by their own `score_answer`, strict by default
  (`procedural.py`).
Every verifier returns one `Result(reward, correct, reason, answer, details)` per response.

Importing this package is cheap: sympy, math-verify and reasoning-gym are imported only inside
worker processes (and by `procedural.generate`).
"""

from lad_jax.verifiers.code import CodeVerifier
from lad_jax.verifiers.code import FunctionTests
from lad_jax.verifiers.code import StdioTests
from lad_jax.verifiers.extraction import extract_answer
from lad_jax.verifiers.math import MathVerifier
from lad_jax.verifiers.procedural import ProceduralVerifier
from lad_jax.verifiers.result import Result
