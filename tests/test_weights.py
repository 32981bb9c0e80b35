"""Weight I/O: HF safetensors -> sharded params -> safetensors, errors, GGUF un-permutation."""

from __future__ import annotations

import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lad_jax import models, sharding
from lad_jax.models import gguf_io, testing, weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _jax_params(cfg, seed=0):
  return jax.tree.map(jnp.asarray, testing.random_params(cfg, seed=seed))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_then_load_is_bit_exact(tmp_path, dtype):
  cfg = testing.tiny_config("llama", tie_word_embeddings=False, qkv_bias=True, o_bias=True,
                            param_dtype=dtype, eos_token_ids=(2, 5), bos_token_id=1)
  params = _jax_params(cfg)
  # Small shards: exercises model-0000i-of-0000N.safetensors + the index.
  names = models.save_hf(params, cfg, tmp_path, max_shard_bytes=40_000)
  assert len(names) > 1 and os.path.isfile(tmp_path / weights.INDEX_FILE)
  cfg2, params2 = models.load_hf(tmp_path, param_dtype=dtype)
  assert cfg2 == cfg
  chex.assert_trees_all_equal(params2, params)
  chex.assert_trees_all_equal_dtypes(params2, params)
  # Stored bf16, loaded as fp32 masters: exact too (bf16 -> fp32 is lossless).
  _, params32 = models.load_hf(tmp_path, param_dtype="float32")
  chex.assert_trees_all_equal(params32, jax.tree.map(lambda x: x.astype(jnp.float32), params))


@pytest.mark.parametrize("arch,overrides", [
    ("qwen2", dict(tie_word_embeddings=False)),
    ("llama", dict(tie_word_embeddings=True, rope_scaling=models.RopeScaling(
        "llama3", 4.0, original_max_position_embeddings=64)))])
def test_transformers_loads_our_export_with_equal_logits(tmp_path, arch, overrides):
  cfg = testing.tiny_config(arch, **overrides)
  params = _jax_params(cfg, seed=1)
  models.save_hf(params, cfg, tmp_path)
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  assert type(hf).__name__ == {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[arch]
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11))
  with torch.no_grad():
    ref = hf(torch.tensor(tokens)).logits.numpy()
  got = jax.jit(lambda p, t: models.Decoder(cfg).apply({"params": p}, t).logits)(params, tokens)
  assert np.abs(ref).max() > 1.0
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)


class _RecordingSource(weights.SafetensorsSource):
  """Records the size of every block read."""

  def __init__(self, directory):
    super().__init__(directory)
    self.reads = []

  def read(self, name, slices):
    block = super().read(name, slices)
    self.reads.append((name, block.size))
    return block


def test_sharded_load_reads_only_each_devices_slices(tmp_path):
  cfg = testing.tiny_config("qwen2")
  params = _jax_params(cfg, seed=2)
  models.save_hf(params, cfg, tmp_path)
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  source = _RecordingSource(tmp_path)
  loaded = models.load_params(source, cfg, mesh=mesh)
  chex.assert_trees_all_equal(loaded, params)
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x.sharding, loaded),
                              models.param_shardings(cfg, mesh))
  # q_proj [D, N, H] is split 4 (D over fsdp) x 2 (N over tensor): 8 reads of 1/8 per layer,
  # each read once, never the whole tensor.
  q_reads = [n for name, n in source.reads if name == "model.layers.0.self_attn.q_proj.weight"]
  per_layer = cfg.hidden_size * cfg.num_heads * cfg.head_dim
  assert sorted(q_reads) == [per_layer // 8] * 8
  # Replicated tensors (norms) are read once, not once per device.
  assert [n for name, n in source.reads if name == "model.norm.weight"] == [cfg.hidden_size]
  source.close()


def _checkpoint(tmp_path, **cfg_overrides):
  cfg = testing.tiny_config("qwen2", **cfg_overrides)
  models.save_hf(_jax_params(cfg), cfg, tmp_path, max_shard_bytes=60_000)
  return cfg


def test_missing_directory_config_and_shard_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist.*config.json.*model.safetensors"):
    models.load_hf(tmp_path / "nope")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="No config.json"):
    models.load_hf(empty)
  (empty / "config.json").write_text(json.dumps(testing.tiny_config("qwen2").to_hf()))
  with pytest.raises(FileNotFoundError, match="No safetensors weights.*model.safetensors"):
    models.load_hf(empty)
  d = tmp_path / "sharded"
  _checkpoint(d)
  with open(d / weights.INDEX_FILE) as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
  os.remove(d / shard)
  with pytest.raises(FileNotFoundError, match=f"{shard}.*missing"):
    models.load_hf(d)


def test_missing_tensor_shape_mismatch_and_architecture_errors(tmp_path):
  d = tmp_path / "ckpt"
  _checkpoint(d)
  with open(d / "config.json") as f:
    good = json.load(f)

  def write(**changes):
    with open(d / "config.json", "w") as f:
      json.dump({**good, **changes}, f)

  write(intermediate_size=good["intermediate_size"] + 2)
  with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight'.*shape \(96, 64\)"
                     r".*implies \(98, 64\)"):
    models.load_hf(d)
  write(tie_word_embeddings=False, architectures=["LlamaForCausalLM"], model_type="llama",
        attention_bias=True)  # Llama with attention_bias also needs o_proj.bias
  with pytest.raises(ValueError, match="'model.layers.0.self_attn.o_proj.bias'.*not found"):
    models.load_hf(d)
  write(architectures=["MistralForCausalLM"])
  with pytest.raises(ValueError, match="Unsupported architecture.*Qwen2ForCausalLM"):
    models.load_hf(d)


def test_tied_checkpoint_loads_untied_config_error_mentions_tying(tmp_path):
  d = tmp_path / "tied"
  _checkpoint(d, tie_word_embeddings=True)
  with open(d / "config.json") as f:
    cfg = json.load(f)
  cfg["tie_word_embeddings"] = False
  with open(d / "config.json", "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match="lm_head.weight.*tie_word_embeddings"):
    models.load_hf(d)


def _llama_cpp_permute(w, n_head, n_head_kv):
  """convert_hf_to_gguf.py's LlamaModel.permute (llama.cpp, MIT license)."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def test_unpermute_inverts_llama_cpp_permute():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(9 * 64, 576))
  k = rng.normal(size=(3 * 64, 576))
  np.testing.assert_array_equal(gguf_io.unpermute_rope_rows(_llama_cpp_permute(q, 9, 9), 9), q)
  np.testing.assert_array_equal(gguf_io.unpermute_rope_rows(_llama_cpp_permute(k, 9, 3), 3), k)
  bias = rng.normal(size=(3 * 64,))
  np.testing.assert_array_equal(
      gguf_io.unpermute_rope_rows(_llama_cpp_permute(bias, 9, 3), 3), bias)
  assert not np.array_equal(_llama_cpp_permute(q, 9, 9), q)


def test_transform_slices_equal_slices_of_full_transform():
  """Reading a block through Transform.read == transforming everything, then slicing."""
  rng = np.random.default_rng(0)
  cases = [(weights.LINEAR_TO_HEADS, (8, 3, 4)), (weights.LINEAR_FROM_HEADS, (3, 4, 8)),
           (weights.LINEAR, (6, 10)), (weights.BIAS_TO_HEADS, (3, 4))]
  for tr, ours_shape in cases:
    hf = rng.normal(size=tr.hf_shape(ours_shape))
    src = type("S", (), {"read": lambda self, n, sl: hf[sl]})()
    full = tr.read(src, "x", ours_shape, [slice(None)] * len(ours_shape))
    np.testing.assert_array_equal(tr.to_hf(full), hf)
    sl = [slice(1, n) if n > 1 else slice(None) for n in ours_shape]
    np.testing.assert_array_equal(tr.read(src, "x", ours_shape, sl), full[tuple(sl)])


def test_pad_batch():
  tokens, mask = models.pad_batch([[1, 2, 3], [4]], pad_id=0, side="left")
  np.testing.assert_array_equal(tokens, [[1, 2, 3], [0, 0, 4]])
  np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
  tokens, mask = models.pad_batch([[1, 2, 3], [4]], pad_id=9, side="right", length=4)
  np.testing.assert_array_equal(tokens, [[1, 2, 3, 9], [4, 9, 9, 9]])
  with pytest.raises(ValueError, match="shorter"):
    models.pad_batch([[1, 2, 3]], pad_id=0, length=2)
  with pytest.raises(ValueError, match="side"):
    models.pad_batch([[1]], pad_id=0, side="middle")


def test_tokenizer_directory_round_trip(tmp_path):
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=_tiny_tokenizer(), eos_token="</s>", pad_token="<pad>")
  tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                       "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
  tok.save_pretrained(tmp_path)
  loaded = models.load_tokenizer(tmp_path)
  ids = models.encode_chat(loaded, [{"role": "user", "content": "ab"}])
  assert ids == loaded.encode("<user>ab<assistant>", add_special_tokens=False)
  assert len(ids) == len("<user>ab<assistant>")  # one id per character
  shutil.rmtree(tmp_path)
  with pytest.raises(FileNotFoundError, match="Tokenizer directory"):
    models.load_tokenizer(tmp_path)


def _tiny_tokenizer():
  from tokenizers import Tokenizer, models as tk_models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  chars = sorted(set("<>/abcdefghijklmnopqrstuvwxyz"))
  vocab = {"<pad>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
  t = Tokenizer(tk_models.WordLevel(vocab, unk_token="<pad>"))
  t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
  return t
