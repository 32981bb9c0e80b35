"""Datasets and prompts.

- `sources`: expected local files of the math datasets and how records are normalised.
- `builders`: tfds builders writing array_record files (math, HumanEval, procedural tasks) and
  `load` / `load_procedural` to read them back (imports tensorflow_datasets; no TensorFlow needed).
- `prompts`: prompt templates applied with a tokenizer's chat template.
"""

from lad_jax.data import prompts
from lad_jax.data import sources
