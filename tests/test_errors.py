"""One-line errors: the CLI wrapper (lad_jax/cli.py), data-format errors, mesh errors.

The entry points run as subprocesses: a user's mistake must exit with status 2 and one line on
stderr naming the file / key / flag, before anything is compiled; LAD_VERBOSE=1 or --verbose
shows the traceback instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from lad_jax import errors
from lad_jax import models
from lad_jax import sharding
from lad_jax.data import code_records
from lad_jax.models import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, verbose_env=False):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("LAD_VERBOSE", None)
  if verbose_env:
    env["LAD_VERBOSE"] = "1"
  return subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                        timeout=120, env=env, cwd=ROOT, check=False)


def _math_rl(*args, **kw):
  return _run(os.path.join(ROOT, "experiments", "math_rl.py"), *args, **kw)


def _one_line_error(result, prog, *needles):
  """The single stderr line of a failed run, checked for exit status 2 and `needles`."""
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2, result.stderr[-3000:]
  assert len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith(f"{prog}: error: "), lines[0]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny HF checkpoint in several shards (config.json + index + 11 safetensors files)."""
  path = tmp_path_factory.mktemp("hf")
  cfg = testing.tiny_config("qwen2")
  params = jax.tree.map(jnp.asarray, testing.random_params(cfg))
  names = models.save_hf(params, cfg, path, max_shard_bytes=40_000)
  assert len(names) > 2
  return path, names


def _copy_dir(src, dst):
  os.makedirs(dst)
  for name in os.listdir(src):
    with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
      g.write(f.read())
  return dst


def _truncate(path, size):
  with open(path, "r+b") as f:
    f.truncate(size)


# ------------------------------------------------------------------------------------------------
# math_rl.py: flag-parse errors, config values, model files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needles", [
    (("--config=configs/nope.py",),
     ("--config=configs/nope.py", "No such file", "configs/nope.py")),
    (("--config=configs/tiny.py:smok",), ("--config=configs/tiny.py:smok", "'smok'", "'smoke'")),
    (("--config=configs/tiny.py", "--config.optim.lrr=1"),
     ("--config.optim.lrr=1", "'lrr'", 'Did you mean "lr"')),
    (("--config=configs/tiny.py", "--config.optim.lr=abc"), ("--config.optim.lr=abc", "'abc'")),
    (("--config=configs/tiny.py", "--config.optim.lr=nan"), ("config.optim.lr=nan", ">= 0")),
    (("--config=configs/tiny.py", "--config.loss.hparams.lad.eta=0"),
     ("config.loss.hparams.lad.eta=0.0", "> 0")),
    (("--config=configs/tiny.py", "--config.sampling.prompt_buckets=(64,)"),
     ("config.sampling.prompt_buckets=(64,)", "max_prompt_tokens=256")),
    (("--config=configs/tiny.py", "--config.sampling.group_size=1"),
     ("config.sampling.group_size=1", ">= 2")),
    (("--config=configs/tiny.py", "--config.mesh.data=3"), ("{'data': 3", "config.mesh")),
    (("--config=configs/tiny.py", "unexpected"), ("Unexpected arguments", "unexpected")),
], ids=["missing_config_file", "bad_config_arg", "misspelt_key", "unparsable_value", "nan_lr",
        "eta_zero", "prompt_buckets", "group_size_1", "mesh", "extra_argument"])
def test_math_rl_errors_are_one_line(args, needles, tmp_path):
  # A fresh workdir: a run left in the default one would be refused first (run_dir guard).
  _one_line_error(_math_rl(*args, f"--config.workdir={tmp_path}"), "math_rl", *needles)


def test_verbose_shows_the_traceback():
  args = ("--config=configs/tiny.py", "--config.optim.lrr=1")
  for result in (_math_rl(*args, verbose_env=True), _math_rl(*args, "--verbose")):
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert 'Did you mean "lr"' in result.stderr


def test_truncated_shard_is_named_by_math_rl(hf_dir, tmp_path):
  src, names = hf_dir
  model = _copy_dir(src, tmp_path / "model")
  _truncate(model / names[3], 1000)
  result = _math_rl("--config=configs/tiny.py", "--config.model.source=hf",
                    f"--config.model.path={model}", f"--config.workdir={tmp_path / 'run'}")
  _one_line_error(result, "math_rl", str(model / names[3]), "truncated", "download")


# ------------------------------------------------------------------------------------------------
# bandit.py
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needles", [
    (("--eta=0",), ("--eta=0.0", "> 0")),
    (("--eta=nan,1",), ("--eta=nan",)),
    (("--steps=0",), ("--steps=0", ">= 1")),
], ids=["eta_zero", "eta_nan", "steps_zero"])
def test_bandit_errors_are_one_line(args, needles, tmp_path):
  result = _run(os.path.join(ROOT, "experiments", "bandit.py"), *args, f"--out={tmp_path}")
  _one_line_error(result, "bandit", *needles)
  assert not os.listdir(tmp_path)  # nothing ran


@pytest.mark.parametrize("settings, match", [
    (dict(eta=["0"]), r"--eta=0\.0 .*> 0"),
    (dict(eta=["inf"]), r"--eta=inf"),
    (dict(eta=["x"]), r"--eta='x' is not a number"),
    (dict(eta=[]), r"--eta is empty"),
    (dict(eta=[1.0], lr=0.0), r"--lr=0\.0 .*> 0"),
    (dict(eta=[1.0], temperature=float("nan")), r"--temperature=nan"),
    (dict(eta=[1.0], batch_size=0), r"--batch_size=0 .*>= 1"),
    (dict(eta=[1.0], seeds=True), r"--seeds=True .*integer"),
    (dict(eta=[1.0], refreshes=-1), r"--refreshes=-1 .*>= 0"),
    (dict(eta=[1.0], log_every=0), r"--log_every=0 .*>= 1"),
    (dict(eta=[1.0], steps=15, log_every=10), r"--steps=15 is not a multiple of --log_every=10"),
    (dict(eta=[1.0], steps=10, refreshes=10, log_every=10), r"--refreshes=10 must be below"),
    (dict(eta=[1.0], methods=["nope"]), r"--methods: Unknown bandit method 'nope'"),
])
def test_bandit_validate(settings, match):
  from lad_jax import bandit  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match=match):
    bandit.validate(**settings)


def test_bandit_validate_accepts_the_defaults():
  from lad_jax import bandit  # pylint: disable=g-import-not-at-top
  assert bandit.validate(eta=["0.5", "1"], steps=4000, seeds=5, lr=5e-3, batch_size=32,
                         temperature=1.5, exact_temperature=1.0, refreshes=2,
                         log_every=10) == [0.5, 1.0]


# ------------------------------------------------------------------------------------------------
# Data-format errors through the CLI wrapper, and the readers themselves
# ------------------------------------------------------------------------------------------------


def _cli_script(tmp_path, body):
  path = tmp_path / "entry.py"
  path.write_text(textwrap.dedent(f"""\
      from lad_jax import cli
      from lad_jax.data import code_records

      def main(argv):
      {textwrap.indent(textwrap.dedent(body), "  ")}

      if __name__ == "__main__":
        cli.run_main(main, prog="entry")
      """))
  return str(path)


def test_cli_prints_data_format_and_missing_file_errors(tmp_path):
  bad = tmp_path / "code.jsonl"
  bad.write_text('{"problem": "p", "tests": [{"input": "1"}]}\n')
  script = _cli_script(tmp_path, f"code_records.read_code_records({str(bad)!r})")
  _one_line_error(_run(script), "entry", f"{bad}:1:", 'test 1 has no "output"')
  verbose = _run(script, verbose_env=True)
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr
  assert "DataFormatError" in verbose.stderr
  script = _cli_script(tmp_path, "open('/nonexistent/data.jsonl')")
  _one_line_error(_run(script), "entry", "/nonexistent/data.jsonl")


def test_cli_keeps_the_traceback_of_a_bug(tmp_path):
  result = _run(_cli_script(tmp_path, "raise RuntimeError('a bug')"))
  assert result.returncode == 1 and "Traceback" in result.stderr and "a bug" in result.stderr


@pytest.mark.parametrize("lines, match", [
    (['{"problem": "p", "tests": [{"input": "1", "output": "2"}]}', '{"problem": "p", "tes'],
     r":2: invalid JSON \(.* at column \d+\)"),
    (['{"problem": "p", "tests": [{"input": "1", "output": "2"}, {"input": "3"}]}'],
     r':1: test 2 has no "output"'),
    (['{"problem": "p", "tests": [{"output": "2"}]}'], r':1: test 1 has no "input"'),
    (['{"tests": [{"input": "1", "output": "2"}]}'], r':1: "problem" is missing'),
    (['{"problem": "p", "tests": []}'], r':1: "tests" must be a non-empty list'),
    (['{"problem": "p", "tests": ["x"]}'], r":1: test 1 is a str"),
    (['[1, 2]'], r":1: a JSON list, not an object"),
])
def test_code_records_name_file_and_line(tmp_path, lines, match):
  path = tmp_path / "train.jsonl"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(errors.DataFormatError, match=match) as e:
    code_records.read_code_records(str(path))
  assert str(e.value).startswith(f"{path}:") and "\n" not in str(e.value)


def test_code_records_read_good_lines(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text('{"problem": "add", "tests": [{"input": "1 2", "output": 3}]}\n\n'
                  '{"problem": "neg", "tests": [{"input": "1", "output": "-1"}], "x": 0}\n')
  assert code_records.read_code_records(str(path)) == [
      {"problem": "add", "tests": [("1 2", "3")]}, {"problem": "neg", "tests": [("1", "-1")]}]
  with pytest.raises(FileNotFoundError):
    code_records.read_code_records(str(tmp_path / "missing.jsonl"))


def test_truncated_shard_names_the_file(hf_dir, tmp_path):
  src, names = hf_dir
  for size in (5, 1000):  # inside the header, inside the tensor data
    model = _copy_dir(src, tmp_path / f"model{size}")
    _truncate(model / names[5], size)
    with pytest.raises(errors.DataFormatError) as e:
      models.load_hf(model)
    msg = str(e.value)
    assert msg.startswith(str(model / names[5])) and "download that file again" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("file_name, text, match", [
    ("config.json", '{"architectures": ["Qwen2ForCausalLM"],\n "hidden_size": }',
     r"config\.json:2: invalid JSON \(Expecting value at column 17\)"),
    ("config.json", "[1]", r"config\.json: a JSON list"),
    ("model.safetensors.index.json", '{"weight_map": {"a": "b",}}',
     r"model\.safetensors\.index\.json:1: invalid JSON \(.* at column 26\)"),
    ("model.safetensors.index.json", '{"metadata": {}}',
     r'model\.safetensors\.index\.json: no "weight_map"'),
])
def test_broken_json_names_file_and_position(hf_dir, tmp_path, file_name, text, match):
  model = _copy_dir(hf_dir[0], tmp_path / "model")
  (model / file_name).write_text(text)
  with pytest.raises(errors.DataFormatError, match=match) as e:
    models.load_hf(model)
  assert str(model / file_name) in str(e.value) and "\n" not in str(e.value)


def test_read_json_is_a_value_error(tmp_path):
  path = tmp_path / "x.json"
  path.write_text('{"a": 1}')
  assert errors.read_json(path) == {"a": 1}
  path.write_text('{"a": 1')
  with pytest.raises(ValueError, match=r"x\.json:1: invalid JSON"):
    errors.read_json(path)


# ------------------------------------------------------------------------------------------------
# Mesh
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes, match", [
    (dict(data=3, fsdp=1), r"needs 3 devices but 8 are available.*config\.mesh"),
    (dict(data=3), r"8 device\(s\) cannot be split.*3 does not divide 8"),
    (dict(data=0), r"positive ints"),
    (dict(data=2.0), r"positive ints"),
    (dict(data=True), r"positive ints"),
    (dict(data=-1, fsdp=-1), r"At most one"),
])
def test_invalid_mesh_is_a_config_error(sizes, match):
  with pytest.raises(errors.ConfigError, match=match) as e:
    sharding.make_mesh(**sizes)
  assert "\n" not in str(e.value)
