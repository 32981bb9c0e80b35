"""Export to Hugging Face: transformers loads what experiments/export_hf.py / policy.export_hf
write and computes the same logits as our decoder (a tiny run's checkpoint, SmolLM2-135M)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from lad_jax import models
from lad_jax import policy

from saved_runs import ROOT, save_tiny_run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENS = [[5, 17, 99, 3, 42, 64, 7, 120]]


def export_cmd(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "export_hf.py"),
                         *args], capture_output=True, text=True, env=env, timeout=300)


def _our_logits(cfg, params, tokens):
  return np.asarray(models.Decoder(cfg).apply({"params": params}, jnp.asarray(tokens)).logits)


def _hf_logits(directory, tokens):
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def test_export_command_round_trip_of_a_tiny_run(tmp_path):
  workdir, out = tmp_path / "run", tmp_path / "hf"
  config, saved = save_tiny_run(workdir, steps=(1, 2))
  got = export_cmd(f"--workdir={workdir}", "--step=1", f"--out={out}")
  assert got.returncode == 0, got.stderr
  lines = got.stdout.strip().splitlines()
  assert lines[0].startswith(f"exported step 1 of {workdir} to {out}")
  assert lines[1] == ("note: no tokenizer files: the run's CharTokenizer has no Hugging Face "
                      "form (weights and config only)")
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
  cfg = policy.model_config(config)
  ours = _our_logits(cfg, saved[1], TOKENS)
  assert np.abs(ours).max() > 1
  np.testing.assert_allclose(_hf_logits(str(out), TOKENS), ours, atol=1e-4, rtol=0)


def test_export_command_bad_workdir_is_one_line(tmp_path):
  got = export_cmd(f"--workdir={tmp_path}", f"--out={tmp_path / 'hf'}")
  assert got.returncode == 2
  assert got.stderr.strip() == (f"export_hf: error: {tmp_path}/config.json does not exist, so "
                                f"'{tmp_path}' is not the workdir of a run; pass --config=<the "
                                "run's config file> as well.")


@pytest.mark.slow  # SmolLM2-135M: read the GGUF, write 0.5 GB, one forward pass in each
def test_export_smollm2_with_its_tokenizer(tmp_path, gguf_path):
  cfg, params = models.load_gguf(gguf_path)
  tokenizer = models.load_tokenizer(gguf_path)
  out = policy.export_hf(params, cfg, tokenizer=tokenizer, out_dir=str(tmp_path))
  assert out.note is None and "tokenizer.json" in out.files
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
  question = [{"role": "user", "content": "What is 2 + 3?"}]
  ids = models.encode_chat(tokenizer, question)
  assert models.encode_chat(hf_tok, question) == ids
  tokens = [ids[-8:]]
  ours = _our_logits(cfg, params, tokens)
  np.testing.assert_allclose(_hf_logits(str(tmp_path), tokens), ours, atol=1e-4, rtol=0)
