"""Final-answer extraction from model outputs: boxed, `Answer:` lines, <answer> tags, GSM8K `####`.

Pure string functions, linear in the length of the text (no backtracking regexes), so they are safe
to run in the trainer's process; only the equivalence check (sympy) runs in worker processes.

Conventions follow the reward code the baselines use:
- `\\boxed{...}` / `\\fbox{...}`: the LAST box counts (Qwen math prompt; verl `math.py`
  `last_boxed_only_string`), with nested braces, and `\\boxed 5` without braces (MATH's
  `"\\boxed "` case: the token up to the next space or `$`). A last box whose braces never close
  (a truncated response) gives no answer rather than falling back to an earlier box.
- `Answer: ...`: the last match of `(?i)Answer\\s*:\\s*([^\\n]+)` (DAPO, verl
  `reward_score/math_dapo.py`, which also looks only at the last 300 characters).
- `<answer>...</answer>`: the last closed tag pair (R1-style and reasoning-gym prompts); a box
  inside the tag wins over the raw tag text.
- GSM8K: the text after the last `####` up to the end of its line.
- Last number: the last integer or decimal anywhere in the text (verl `gsm8k.py`
  `extract_solution(method="flexible")`); a lenient fallback for small models that answer
  in prose ("0 - 4 = -4.") instead of the requested format. Never a default: it also rewards
  a correct number that merely ends a wrong derivation.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_LINE_RE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
_DAPO_TAIL_CHARS = 300  # verl math_dapo.compute_score: solution_str[-300:]
# A sign only when it touches the digits and is not a binary minus ("4-1" -> "4", "1"); commas
# group thousands ("1,234"). No nested quantifiers, so matching stays linear.
_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?|(?<=\w)\d+(?:\.\d+)?")


def _find_closing_brace(text: str, open_idx: int) -> Optional[int]:
  """Index of the `}` matching the `{` at `open_idx`; escaped `\\{`, `\\}` are literal text."""
  depth = 0
  i = open_idx
  n = len(text)
  while i < n:
    c = text[i]
    if c == "\\" and i + 1 < n and text[i + 1] in "{}":
      i += 2
      continue
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return i
    i += 1
  return None


def last_boxed(text: str) -> Optional[str]:
  """Content of the last `\\boxed{...}` / `\\fbox{...}` / `\\boxed x` in `text`, or None.

  Returns None when there is no box, when the last box is malformed (unclosed brace, nothing after
  `\\boxed`), or when it is empty.
  """
  start = -1
  cmd_len = 0
  for cmd in _BOX_COMMANDS:
    idx = text.rfind(cmd)
    # `\boxed` also matches the start of e.g. `\boxedfoo`; only a real command boundary counts.
    while idx != -1:
      after = idx + len(cmd)
      if after >= len(text) or not text[after].isalpha():
        break
      idx = text.rfind(cmd, 0, idx)
    if idx > start:
      start, cmd_len = idx, len(cmd)
  if start < 0:
    return None
  i = start + cmd_len
  n = len(text)
  while i < n and text[i] in " \t":
    i += 1
  if i >= n:
    return None
  if text[i] == "{":
    close = _find_closing_brace(text, i)
    if close is None:
      return None
    content = text[i + 1:close].strip()
  else:
    if text[i] == "}":
      return None
    j = i
    while j < n and not text[j].isspace() and text[j] != "$":
      j += 1
    content = text[i:j].strip()
  return content or None


def answer_tag(text: str) -> Optional[str]:
  """Content of the last closed `<answer>...</answer>` pair (a box inside it wins), or None."""
  end = text.rfind("</answer>")
  if end < 0:
    return None
  begin = text.rfind("<answer>", 0, end)
  if begin < 0:
    return None
  content = text[begin + len("<answer>"):end]
  boxed = last_boxed(content)
  if boxed is not None:
    return boxed
  return content.strip() or None


def answer_line(text: str, *, tail_chars: Optional[int] = _DAPO_TAIL_CHARS) -> Optional[str]:
  """The last `Answer: ...` line (DAPO), looking only at the last `tail_chars` characters."""
  if tail_chars is not None:
    text = text[-tail_chars:]
  matches = _ANSWER_LINE_RE.findall(text)
  if not matches:
    return None
  content = matches[-1].strip()
  boxed = last_boxed(content)
  if boxed is not None:
    return boxed
  # "Answer: $\frac{1}{2}$." -> "\frac{1}{2}"
  content = content.rstrip(".").strip()
  if len(content) >= 2 and content[0] == "$" and content[-1] == "$":
    content = content.strip("$").strip()
  return content or None


def gsm8k_answer(text: str) -> Optional[str]:
  """The text after the last `####` on its line (GSM8K's gold format), or None."""
  idx = text.rfind("####")
  if idx < 0:
    return None
  content = text[idx + 4:].split("\n", 1)[0].strip()
  return content.rstrip(".").strip() or None


def last_number(text: str) -> Optional[str]:
  """The last number in `text` ("-4", "3.5", "1234" from "1,234"), trailing "." dropped; or None.

  A "-" counts as a sign unless a letter, digit or "." comes right before it, so the last
  number of "4-1" is "1" and of "0 - 4 = -4." is "-4".
  """
  matches = _NUMBER_RE.findall(text)
  if not matches:
    return None
  return matches[-1].replace(",", "")


EXTRACTORS: dict[str, Callable[[str], Optional[str]]] = {
    "boxed": last_boxed,
    "answer_tag": answer_tag,
    "answer_line": answer_line,
    "gsm8k": gsm8k_answer,
    "last_number": last_number,
}
DEFAULT_EXTRACTORS = ("boxed", "answer_tag", "answer_line", "gsm8k")


def validate_extractors(extractors: Sequence[str]) -> tuple[str, ...]:
  """Checks extractor names; raises ValueError naming the valid ones."""
  if isinstance(extractors, str):
    extractors = (extractors,)
  extractors = tuple(extractors)
  if not extractors:
    raise ValueError(f"extractors is empty; choose from {sorted(EXTRACTORS)}.")
  unknown = [e for e in extractors if e not in EXTRACTORS]
  if unknown:
    raise ValueError(f"Unknown answer extractor(s) {unknown}; valid ones: {sorted(EXTRACTORS)}.")
  return extractors


def extract_answer(
    text: str, *, extractors: Sequence[str] = DEFAULT_EXTRACTORS
) -> tuple[Optional[str], Optional[str]]:
  """Tries `extractors` in order and returns `(answer, extractor_name)`, or `(None, None)`.

  The default order prefers an explicit box over the other conventions, so "Answer: \\boxed{5}"
  and "<answer>\\boxed{5}</answer>" both give "5".
  """
  if not isinstance(text, str):
    raise ValueError(f"Model output must be a str, got {type(text).__name__}.")
  for name in validate_extractors(extractors):
    answer = EXTRACTORS[name](text)
    if answer is not None:
      return answer, name
  return None, None


def strip_gsm8k_gold(answer: str) -> str:
  """GSM8K gold solutions end with `#### 72`: returns "72" (commas removed); other strings as is."""
  found = gsm8k_answer(answer)
  if found is None:
    return answer.strip()
  return found.replace(",", "")
