"""Prompt templates, applied through a tokenizer's chat template.

    text = apply_chat_template(tokenizer, record["problem"], template="math")
    ids = apply_chat_template(tokenizer, record["problem"], template="math", tokenize=True)

Templates:
  "math": the Qwen2.5-Math prompt used by verl / entropy-mechanism / FlowRL for DAPO-Math and the
    math evaluations: "{question}\\nPlease reason step by step, and put your final answer within
    \\boxed{}."
  "dapo": DAPO-Math-17k's own instruction (answer on a final "Answer:" line, verl `math_dapo`).
  "code": stdin/stdout problems (LiveCodeBench / DeepCoder): one ```python block that reads stdin.
  "code_function": HumanEval-style completion of a given function.
  "procedural": reasoning-gym questions, answer inside <answer></answer> (reasoning-gym's
    "default" system prompt convention).

Few-shot examples (`examples=[(question, response), ...]`) go in front of the question as earlier
user / assistant turns, each user turn formatted with the same template, so a small instruct
model sees the answer format once before it has to produce it.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

Example = tuple[str, str]  # (question, the response to imitate)

TEMPLATES = {
    "math": "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "dapo": ("Solve the following math problem step by step. The last line of your response "
             "should be of the form Answer: $Answer (without quotes) where $Answer is the answer "
             "to the problem.\n\n{question}\n\nRemember to put your answer on its own line after "
             "\"Answer:\"."),
    "code": ("{question}\n\nWrite a Python 3 program that solves the problem above. It must read "
             "the input from standard input and write the answer to standard output. Give the "
             "complete program in a single ```python code block at the end of your response."),
    "code_function": ("Complete the following Python function. Give the complete function "
                      "(with its signature) in a single ```python code block.\n\n```python\n"
                      "{question}```"),
    "procedural": ("{question}\nThink step by step, then give only the final answer inside "
                   "<answer></answer> tags."),
}


def format_prompt(question: str, *, template: str = "math") -> str:
  """The user message: `question` inserted into `template` (a TEMPLATES key)."""
  if template not in TEMPLATES:
    raise ValueError(f"Unknown prompt template {template!r}; valid ones: {sorted(TEMPLATES)}.")
  if not isinstance(question, str) or not question.strip():
    raise ValueError("question must be a non-empty string.")
  return TEMPLATES[template].format(question=question)


def check_examples(examples: Sequence[Example]) -> list[Example]:
  """Few-shot examples as a list of (question, response) str pairs; ValueError otherwise."""
  out = []
  for i, ex in enumerate(examples or ()):
    if (not isinstance(ex, (tuple, list)) or len(ex) != 2
        or not all(isinstance(s, str) and s.strip() for s in ex)):
      raise ValueError(f"Few-shot example {i} must be a (question, response) pair of non-empty "
                       f"strings, got {ex!r}.")
    out.append((ex[0], ex[1]))
  return out


def format_text_prompt(question: str, *, template: str = "math",
                       system_prompt: Optional[str] = None,
                       examples: Sequence[Example] = ()) -> str:
  """The raw-text prompt (no chat template): system, examples and question, blank-line separated."""
  parts = [system_prompt] if system_prompt else []
  for q, a in check_examples(examples):
    parts.append(format_prompt(q, template=template) + "\n" + a)
  parts.append(format_prompt(question, template=template))
  return "\n\n".join(parts)


def chat_messages(question: str, *, template: str = "math", system_prompt: Optional[str] = None,
                  examples: Sequence[Example] = ()) -> list[dict[str, str]]:
  """[system?, (user, assistant) per example..., user] messages for `question`."""
  messages = []
  if system_prompt:
    messages.append({"role": "system", "content": system_prompt})
  for q, a in check_examples(examples):
    messages.append({"role": "user", "content": format_prompt(q, template=template)})
    messages.append({"role": "assistant", "content": a})
  messages.append({"role": "user", "content": format_prompt(question, template=template)})
  return messages


def apply_chat_template(tokenizer: Any, question: str, *, template: str = "math",
                        system_prompt: Optional[str] = None, tokenize: bool = False,
                        add_generation_prompt: bool = True, examples: Sequence[Example] = ()):
  """Formats `question` with `template` and the tokenizer's chat template.

  Args:
    tokenizer: a transformers tokenizer (anything with `apply_chat_template` and a chat template).
    question: the problem text.
    template: a TEMPLATES key.
    system_prompt: optional system message (None: the chat template's default, if any).
    tokenize: return token ids (list[int]) instead of text.
    add_generation_prompt: end with the assistant turn's header, ready for sampling.
    examples: few-shot (question, response) pairs, shown as earlier turns.

  Returns:
    The prompt text, or its token ids if `tokenize`.
  """
  if not hasattr(tokenizer, "apply_chat_template"):
    raise ValueError(f"{type(tokenizer).__name__} has no apply_chat_template; pass a transformers "
                     "tokenizer (or use format_prompt for a raw prompt).")
  if getattr(tokenizer, "chat_template", "present") is None:
    raise ValueError("The tokenizer has no chat template (a base model's tokenizer?); set "
                     "tokenizer.chat_template, or use format_prompt for a raw prompt.")
  messages = chat_messages(question, template=template, system_prompt=system_prompt,
                           examples=examples)
  out = tokenizer.apply_chat_template(messages, tokenize=tokenize,
                                      add_generation_prompt=add_generation_prompt)
  if tokenize and hasattr(out, "keys") and "input_ids" in out:  # transformers 5: BatchEncoding
    out = list(out["input_ids"])
  return out
