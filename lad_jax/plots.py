"""Figures of RL runs (matplotlib, Agg): one run's curves, and a comparison of several.

  plots.run_figures(metrics_lib.read_jsonl("<workdir>/metrics.jsonl"), "<workdir>/figures")
  plots.compare_figures(summaries, "<cmp>/figures")    # summaries: lad_jax.compare.run_all's
"""

from __future__ import annotations

import os
from typing import Any, Sequence


def compare_figures(results: Sequence[dict[str, Any]], out_dir: str) -> list[str]:
  """Placeholder until the figures land: nothing is drawn."""
  del results, out_dir
  return []
