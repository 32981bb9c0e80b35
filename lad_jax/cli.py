"""Entry-point wrapper: a user's mistake is one line on stderr and exit status 2, not a traceback.

  if __name__ == "__main__":
    cli.run_main(main, prog="math_rl")     # instead of absl.app.run(main)

`run_main` runs `main` under `absl.app.run` and turns into one line `<prog>: error: <message>`:
  - flag-parse errors, which ml_collections raises inside app.run's flag parsing: a config file
    that does not exist, a bad `--config=file.py:arg` (the config's own ConfigError), a misspelt
    override key (keeping ml_collections' "Did you mean" suggestion), a value that does not parse;
  - the known error classes raised by `main`: `ConfigError`, `DataFormatError` (lad_jax.errors),
    `FileNotFoundError`, and absl's `UsageError`.
Anything else is a bug and keeps its traceback. `--verbose` (or the environment variable
LAD_VERBOSE=1) shows the full traceback of the known errors too.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags

from lad_jax.errors import ConfigError, DataFormatError, RunError

EXIT_STATUS = 2  # as argparse: the command line or its inputs are wrong
VERBOSE_ENV = "LAD_VERBOSE"
# Errors whose message says what to fix; a traceback would only bury it.
KNOWN_ERRORS = (ConfigError, DataFormatError, RunError, FileNotFoundError, app.UsageError)

if "verbose" not in flags.FLAGS:
  flags.DEFINE_bool("verbose", False, "Show the traceback of a config / data / flag error instead "
                    f"of one line (also: {VERBOSE_ENV}=1).")


def verbose(argv: Optional[Sequence[str]] = None) -> bool:
  """--verbose or LAD_VERBOSE=1; read from `argv` when the flags are not (or not yet) parsed."""
  if os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no"):
    return True
  if flags.FLAGS.is_parsed():
    return bool(flags.FLAGS.verbose)
  result = False
  for arg in (sys.argv[1:] if argv is None else argv):
    if arg == "--":
      break
    name, eq, value = arg.lstrip("-").partition("=")
    if name in ("verbose", "noverbose") and arg.startswith("-"):
      try:
        result = (name == "verbose") and (not eq or flags.BooleanParser().parse(value))
      except ValueError:
        pass
  return result


def one_line(text: Any) -> str:
  """The message with its line breaks and runs of spaces folded into single spaces."""
  return " ".join(str(text).split())


def _chain(error: BaseException) -> list[BaseException]:
  """error, then what caused it (__cause__, else __context__), outermost first."""
  out = []
  while error is not None and all(error is not e for e in out):
    out.append(error)
    error = error.__cause__ or error.__context__
  return out


def _flag_prefix(error: BaseException) -> str:
  """'--config=configs/tiny.py:smok' from absl's 'flag --config=configs/tiny.py:smok: ...'."""
  match = re.match(r"flag (--\S+?=.*?): ", str(error))
  return match.group(1) if match else ""


def _override_arg(key: str, argv: Sequence[str]) -> str:
  """The `--flag.a.b=value` argument whose dotted path contains `key` (else '')."""
  for arg in argv:
    path = arg.lstrip("-").partition("=")[0]
    if arg.startswith("--") and "." in path and key in path.split(".")[1:]:
      return arg
  return ""


def _unknown_key_message(error: BaseException, argv: Sequence[str]) -> Optional[str]:
  """A misspelt `--config.x.y=` override: ml_collections' KeyError chain as one line."""
  keys = [e for e in _chain(error) if isinstance(e, KeyError) and e.args]
  if not keys:
    return None
  key = str(keys[-1].args[0]).strip("'\"")
  in_file = re.match(r'Key "([^"]+)" does not exist', key)  # a locked ConfigDict's message
  key = in_file.group(1) if in_file else key
  hint = next((str(e.args[0]) for e in keys if "Did you mean" in str(e.args[0])), "")
  hint = (hint[hint.index("Did you mean"):] if hint else
          "Check the spelling against the config file (every key: config_utils.base_config).")
  arg = _override_arg(key, argv)
  if not arg:  # set inside the config file itself (the schema is locked)
    arg = next((a for a in argv if a.startswith("--config=")), "")
  where = f"{arg}: " if arg else ""
  return f"{where}unknown config key {key!r}. {one_line(hint)}"


def _config_file_message(error: BaseException, argv: Sequence[str]) -> Optional[str]:
  """A config file that ml_collections could not load (its IOError, raised on first access)."""
  loads = [e for e in _chain(error) if isinstance(e, OSError) and (
      "Failed loading config file" in str(e) or "Path to config file" in str(e))]
  if not loads:
    return None
  reason = str(loads[-1]).strip().splitlines()[-1].strip()
  # The argument that named the file, e.g. --config=configs/nope.py.
  arg = next((a for a in argv if a.startswith("-") and "=" in a and
              a.partition("=")[2].split(":")[0] in reason), "")
  where = f"{arg}: " if arg else ""
  return f"{where}cannot load the config file: {reason}; pass an existing configs/*.py file."


def flag_error_message(error: BaseException, argv: Sequence[str]) -> Optional[str]:
  """One line for an error raised while parsing flags, or None for an unknown kind (a bug)."""
  config_errors = [e for e in _chain(error) if isinstance(e, ConfigError)]
  if config_errors:  # raised by a config file's get_config, e.g. a bad ':arg'
    prefix = _flag_prefix(error)
    return f"{prefix + ': ' if prefix else ''}{one_line(config_errors[-1])}"
  for message in (_config_file_message(error, argv), _unknown_key_message(error, argv)):
    if message:
      return message
  if isinstance(error, flags.Error):
    text = str(error)
    if "Error whilst parsing config file" in text:  # ml_collections pastes the traceback in
      text = f"{_flag_prefix(error)}: {text.strip().splitlines()[-1].strip()}"
    return one_line(re.sub(r"^flag (--)", r"\1", text))
  if isinstance(error, SyntaxError) and error.filename:
    return f"{error.filename}:{error.lineno}: {error.msg} (in a config file)"
  return None


def _check_config_files(argv: Sequence[str]) -> None:
  """ml_collections defers a config file's load error to the first access: access it now."""
  for name in list(flags.FLAGS):
    try:
      getattr(flags.FLAGS[name].value, "_lad_cli_probe", None)
    except OSError as e:
      message = _config_file_message(e, argv)
      if message is None:
        raise
      raise ConfigError(message) from e


def fail(prog: str, message: Any) -> None:
  """Prints `<prog>: error: <message>` as one line on stderr and exits with status 2.

  Nothing is logged after it: background work the error left unfinished (e.g. orbax's parallel
  writes of a failed save, reported by asyncio when their tasks are collected at exit) would
  otherwise bury the line under its tracebacks. `--verbose` / LAD_VERBOSE=1 keeps them.
  """
  print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)
  logging.disable(logging.CRITICAL)
  sys.exit(EXIT_STATUS)


def _flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
  """absl flags_parser: parse, load config files now, and print one line for a user's error."""

  def parse(argv: list[str]) -> list[str]:
    try:
      args = flags.FLAGS(argv)
      _check_config_files(argv[1:])
      return args
    except Exception as e:  # pylint: disable=broad-except
      message = one_line(e) if isinstance(e, ConfigError) else flag_error_message(e, argv[1:])
      if message is None or verbose(argv[1:]):
        raise
      fail(prog, message)
      raise  # unreachable: fail exits

  return parse


def run_main(main: Callable[[list[str]], Any], *, prog: Optional[str] = None,
             argv: Optional[list[str]] = None) -> None:
  """absl.app.run(main) with one-line errors (see the module docstring); never returns."""
  prog = prog or os.path.splitext(os.path.basename(sys.argv[0]))[0]

  def guarded(args: list[str]) -> Any:
    try:
      return main(args)
    except KNOWN_ERRORS as e:
      if verbose():
        raise
      fail(prog, e)

  app.run(guarded, argv=argv, flags_parser=_flags_parser(prog))
