"""Tokenizer, chat template and batch padding helpers (transformers tokenizers, offline).

  tok = load_tokenizer(model_dir)                  # or a .gguf path (tokenizer built from it)
  ids = encode_chat(tok, [{"role": "user", "content": "Hi"}])
  tokens_BT, mask_BT = pad_batch([ids_a, ids_b], pad_id=tok.pad_token_id, side="left")
  tok = CharTokenizer()                            # byte-level, for tiny random test models
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np


def load_tokenizer(path: str, **kwargs) -> Any:
  """A transformers tokenizer from a local directory or a .gguf file (never downloads)."""
  import transformers  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if path.endswith(".gguf"):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"GGUF file {path!r} does not exist.")
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(path) or ".", gguf_file=os.path.basename(path), local_files_only=True,
        **kwargs)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"Tokenizer directory {path!r} does not exist; expected tokenizer.json / "
        "tokenizer_config.json (as saved by save_pretrained) in it.")
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)


def encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], *,
                add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
  """Token ids of `messages` rendered with the tokenizer's chat template."""
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("This tokenizer has no chat_template; pass a raw prompt through "
                     "tokenizer.encode instead, or set tokenizer.chat_template.")
  text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                       add_generation_prompt=add_generation_prompt,
                                       **template_kwargs)
  return list(tokenizer.encode(text, add_special_tokens=False))


def pad_batch(sequences: Sequence[Sequence[int]], *, pad_id: int, side: str = "left",
              length: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
  """Pads token lists to [B, T] int32 tokens and a bool mask (True on real tokens).

  Args:
    sequences: token id lists.
    pad_id: id written into padding slots (masked out anyway).
    side: "left" (prompts for generation) or "right".
    length: T (default: the longest sequence); shorter than a sequence is an error.
  """
  if side not in ("left", "right"):
    raise ValueError(f"side must be 'left' or 'right', got {side!r}.")
  longest = max((len(s) for s in sequences), default=0)
  t = longest if length is None else int(length)
  if t < longest:
    raise ValueError(f"length={t} is shorter than the longest sequence ({longest}).")
  tokens = np.full((len(sequences), t), pad_id, np.int32)
  mask = np.zeros((len(sequences), t), bool)
  for i, s in enumerate(sequences):
    sl = slice(t - len(s), t) if side == "left" else slice(0, len(s))
    tokens[i, sl] = np.asarray(s, np.int32)
    mask[i, sl] = True
  return tokens, mask


class CharTokenizer:
  """Byte-level tokenizer for tiny random models: id = ord(c); 0 pad, 1 EOS, 2 unknown.

  Only what the loop needs from a transformers tokenizer: encode, decode, pad/eos ids.
  """

  pad_token_id = 0
  eos_token_id = 1
  unk_id = 2
  chat_template = None

  def __init__(self, vocab_size: int = 128):
    if vocab_size < 128:
      raise ValueError(f"CharTokenizer needs a vocabulary of >= 128 ids, got {vocab_size}.")
    self.vocab_size = vocab_size

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    del add_special_tokens
    return [ord(c) if 3 <= ord(c) < 128 else self.unk_id for c in text]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    del skip_special_tokens
    return "".join(chr(i) for i in ids if 3 <= int(i) < 128)
