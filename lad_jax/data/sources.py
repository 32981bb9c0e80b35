"""Local source files of the math datasets: expected names, accepted fields, normalisation.

Nothing is downloaded at run time. Put the files in one directory (`source_dir`) under these names
(JSON lines, one object per line; a `.json` file holding a list of objects also works):

| dataset       | split | file                | origin (export to JSON lines)                      |
|---------------|-------|---------------------|----------------------------------------------------|
| dapo_math_17k | train | dapo_math_17k.jsonl | BytedTsinghua-SIA/DAPO-Math-17k                    |
| math500       | test  | math500.jsonl       | HuggingFaceH4/MATH-500                             |
| aime2024      | test  | aime2024.jsonl      | HuggingFaceH4/aime_2024 (or Maxwell-Jia/AIME_2024) |
| aime2025      | test  | aime2025.jsonl      | opencompass/AIME2025 (parts I and II together)     |
| amc           | test  | amc.jsonl           | AI-MO/aimo-validation-amc                          |
| olympiadbench | test  | olympiadbench.jsonl | Hothan/OlympiadBench (OE_TO_maths_en_COMP)         |
| minerva       | test  | minerva.jsonl       | math-ai/minervamath                                |
| gsm8k         | train | gsm8k_train.jsonl   | openai/gsm8k (main)                                |
| gsm8k         | test  | gsm8k_test.jsonl    | openai/gsm8k (main)                                |

Every record becomes `{"id", "problem", "answer"}`:
- problem: the first of "problem", "question", "Problem", "Question", "prompt" (a list of chat
  messages, as in DAPO-Math-17k's verl parquet, gives its last user message);
- answer: the first of "answer", "final_answer", "Answer", "ground_truth",
  "reward_model.ground_truth", "solution" (a full solution gives its last \\boxed{}); GSM8K's
  "... #### 72" gives "72"; a list (OlympiadBench) is joined with ", "; numbers are formatted
  without a trailing ".0" (AMC stores 142.0);
- id: the first of "id", "unique_id", "ID", "idx", else "<dataset>-<line index>".
Parquet is not read (no pyarrow here); convert it first, see `_PARQUET_HINT`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from typing import Any, Iterator, Optional

from lad_jax.errors import DataFormatError
from lad_jax.verifiers import extraction

PROBLEM_FIELDS = ("problem", "question", "Problem", "Question", "prompt")
ANSWER_FIELDS = ("answer", "final_answer", "Answer", "ground_truth", "reward_model.ground_truth",
                 "solution")
ID_FIELDS = ("id", "unique_id", "ID", "idx")
_PARQUET_HINT = ("convert it with `python -c \"import pandas as pd; pd.read_parquet('{src}')"
                 ".to_json('{dst}', orient='records', lines=True)\"` on a machine with pandas "
                 "and pyarrow")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """Where a dataset's splits live (file names relative to source_dir) and where they come from."""

  files: dict[str, str]
  origin: str


MATH_SOURCES: dict[str, SourceSpec] = {
    "dapo_math_17k": SourceSpec({"train": "dapo_math_17k.jsonl"},
                                "BytedTsinghua-SIA/DAPO-Math-17k"),
    "math500": SourceSpec({"test": "math500.jsonl"}, "HuggingFaceH4/MATH-500"),
    "aime2024": SourceSpec({"test": "aime2024.jsonl"}, "HuggingFaceH4/aime_2024"),
    "aime2025": SourceSpec({"test": "aime2025.jsonl"}, "opencompass/AIME2025"),
    "amc": SourceSpec({"test": "amc.jsonl"}, "AI-MO/aimo-validation-amc"),
    "olympiadbench": SourceSpec({"test": "olympiadbench.jsonl"}, "Hothan/OlympiadBench"),
    "minerva": SourceSpec({"test": "minerva.jsonl"}, "math-ai/minervamath"),
    "gsm8k": SourceSpec({"train": "gsm8k_train.jsonl", "test": "gsm8k_test.jsonl"},
                        "openai/gsm8k (main)"),
}


def check_name(name: str) -> SourceSpec:
  if name not in MATH_SOURCES:
    raise ValueError(f"Unknown math dataset {name!r}; valid ones: {sorted(MATH_SOURCES)}.")
  return MATH_SOURCES[name]


def _format_hint(name: str, path: str) -> str:
  return (f"Expected {path}: JSON lines, one object per line with a problem field (one of "
          f"{list(PROBLEM_FIELDS)}) and an answer field (one of {list(ANSWER_FIELDS)}), e.g. "
          f"{{\"problem\": \"What is 1+1?\", \"answer\": \"2\"}}; export it from "
          f"{MATH_SOURCES[name].origin}.")


def split_path(name: str, split: str, source_dir: str) -> str:
  """Path of `name`'s `split` file; raises FileNotFoundError (saying what to put where)."""
  spec = check_name(name)
  if split not in spec.files:
    raise ValueError(f"Dataset {name!r} has no split {split!r}; valid ones: {sorted(spec.files)}.")
  path = os.path.join(source_dir, spec.files[split])
  if os.path.isfile(path):
    return path
  for alt in (path[:-len(".jsonl")] + ".json", path + ".gz"):
    if os.path.isfile(alt):
      return alt
  parquet = path[:-len(".jsonl")] + ".parquet"
  if os.path.isfile(parquet):
    raise FileNotFoundError(f"Found {parquet} but parquet cannot be read here; "
                            + _PARQUET_HINT.format(src=parquet, dst=path) + ".")
  raise FileNotFoundError(f"Missing source file for dataset {name!r} split {split!r}. "
                          + _format_hint(name, path))


def available_splits(name: str, source_dir: str) -> list[str]:
  """Splits of `name` whose source file exists in `source_dir`."""
  spec = check_name(name)
  found = []
  for split in spec.files:
    try:
      split_path(name, split, source_dir)
    except FileNotFoundError:
      continue
    found.append(split)
  return found


def file_digest(path: str) -> str:
  """sha256 of a file (the builders key their cache on it, so an edited file is rebuilt)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _iter_objects(path: str) -> Iterator[tuple[int, Any]]:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    if path.endswith(".json"):
      try:
        data = json.load(f)
      except json.JSONDecodeError as e:
        raise DataFormatError(
            f"{path}: not valid JSON ({e}); expected a list of objects.") from e
      if not isinstance(data, list):
        raise DataFormatError(
            f"{path}: expected a JSON list of objects, got {type(data).__name__}.")
      yield from enumerate(data, start=1)
      return
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        yield line_no, json.loads(line)
      except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{line_no}: not valid JSON ({e}). Each line must be one "
                              "JSON object like {\"problem\": ..., \"answer\": ...}.") from e


def _get(record: dict[str, Any], dotted: str) -> Any:
  value: Any = record
  for part in dotted.split("."):
    if not isinstance(value, dict) or part not in value:
      return None
    value = value[part]
  return value


def _problem_text(value: Any) -> Optional[str]:
  if isinstance(value, str):
    return value
  if isinstance(value, list):  # chat messages
    users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
    if users and isinstance(users[-1], str):
      return users[-1]
  return None


def _answer_text(field: str, value: Any) -> Optional[str]:
  if value is None:
    return None
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  if isinstance(value, (int, float)):
    return str(value)
  if isinstance(value, list):
    parts = [_answer_text(field, v) for v in value]
    parts = [p for p in parts if p]
    return ", ".join(parts) if parts else None
  if not isinstance(value, str):
    return None
  text = value.strip()
  if "####" in text:
    return extraction.strip_gsm8k_gold(text)
  if field == "solution":
    return extraction.last_boxed(text)
  if text.startswith("$") and text.endswith("$") and len(text) >= 2:
    text = text.strip("$").strip()
  return text or None


def normalize_record(name: str, record: Any, index: int, where: str) -> dict[str, str]:
  """One source record -> {"id", "problem", "answer"}; ValueError naming the fields it lacks."""
  if not isinstance(record, dict):
    raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}.")
  problem = next((p for p in (_problem_text(_get(record, k)) for k in PROBLEM_FIELDS) if p), None)
  if problem is None:
    raise DataFormatError(f"{where}: no problem text; add one of the fields "
                          f"{list(PROBLEM_FIELDS)} (found fields {sorted(record)}).")
  answer = next((a for a in (_answer_text(k, _get(record, k)) for k in ANSWER_FIELDS) if a), None)
  if answer is None:
    raise DataFormatError(f"{where}: no answer; add one of the fields {list(ANSWER_FIELDS)} "
                          f"(found fields {sorted(record)}).")
  rid = next((str(record[k]) for k in ID_FIELDS if record.get(k) is not None), f"{name}-{index}")
  return {"id": rid, "problem": problem, "answer": answer}


def read_split(name: str, split: str, source_dir: str) -> list[dict[str, str]]:
  """Reads and normalises one split from its local file (see the module docstring)."""
  path = split_path(name, split, source_dir)
  records = [normalize_record(name, obj, i, f"{path}:{line_no}")
             for i, (line_no, obj) in enumerate(_iter_objects(path))]
  if not records:
    raise DataFormatError(f"{path} holds no records. " + _format_hint(name, path))
  return records
