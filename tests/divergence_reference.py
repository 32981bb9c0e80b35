"""Plain float64 generators f and hand-derived f' shared by the divergence and LAD tests.

Written from the paper's Table 5 (JS and Hellinger with its 1/2) and the alpha family's definition;
tests/test_divergences.py checks every f' against central differences of its f.
"""

from __future__ import annotations

import numpy as np


def alpha(a):
  """(f, f') of the alpha family f_a(x) = (x^a - 1 - a(x - 1)) / (a(a - 1))."""
  return (lambda x: (x**a - 1.0 - a * (x - 1.0)) / (a * (a - 1.0)),
          lambda x: (x ** (a - 1.0) - 1.0) / (a - 1.0))


TABLE5 = {
    "kl": (lambda x: x * np.log(x), lambda x: np.log(x) + 1.0),
    "rkl": (lambda x: -np.log(x), lambda x: -1.0 / x),
    "jeffreys": (lambda x: (x - 1.0) * np.log(x), lambda x: np.log(x) + (x - 1.0) / x),
    "tv": (lambda x: np.abs(x - 1.0), lambda x: np.sign(x - 1.0)),
    "hellinger": (lambda x: 0.5 * (np.sqrt(x) - 1.0) ** 2,
                  lambda x: 0.5 * (1.0 - 1.0 / np.sqrt(x))),
    "js": (lambda x: 0.5 * (x * np.log(x) - (x + 1.0) * np.log((x + 1.0) / 2.0)),
           lambda x: 0.5 * (np.log(x) - np.log((x + 1.0) / 2.0))),
}

# A user-supplied convex f (through divergences.custom): chi^2.
CHI2 = (lambda x: (x - 1.0) ** 2, lambda x: 2.0 * (x - 1.0))
