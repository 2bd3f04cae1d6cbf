"""Every user-supplied value that reaches a generated script passes through here.

Three kinds of places, three rules:

- shell words (paths, `export NAME=value`, arguments): quoted with shlex.quote, so any byte but
  NUL passes through literally. In environment values, `${NAME}` (braces required) is the one
  thing expanded by the job's shell, e.g. `/mnt/bb/${USER}`; every other character, `$` and
  backquotes included, stays literal.
- `#SBATCH --key=value` directives: sbatch reads them itself, line by line, without a shell;
  a newline would start a new directive, and a `%` in an output path is a filename pattern. Such
  values are refused rather than quoted.
- names (environment variables, modules, job names): a fixed character set.

A refused value raises QuotingError (a UserError: exit status 2) naming the key and the character.
"""

from __future__ import annotations

import re
import shlex

from rdhpc.errors import UserError

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_JOB_NAME = re.compile(r"[A-Za-z0-9._+-]{1,128}\Z")
_SHELL_WORD = re.compile(r"[A-Za-z0-9._/+:=@,-]+\Z")
# sbatch directive values: no whitespace, quotes, backslash, newline, '#' or '%'
_SBATCH_VALUE = re.compile(r"[A-Za-z0-9._/+:=@,\[\]()*!&|-]+\Z")


class QuotingError(UserError):
    pass


def _describe(ch: str) -> str:
    return {"\n": "a newline", "\r": "a carriage return", "\0": "a NUL byte", " ": "a space", "\t": "a tab"}.get(
        ch, repr(ch))


def check_env_name(name: str) -> list[str]:
    return [] if _ENV_NAME.match(name) else [f"{name!r} is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)"]


def check_job_name(name: str) -> list[str]:
    if _JOB_NAME.match(name):
        return []
    return [f"{name!r} cannot be a job name: use letters, digits and . _ + - (at most 128)"]


def check_shell_word(value: str, what: str) -> list[str]:
    if _SHELL_WORD.match(value):
        return []
    return [f"{value!r} is not {what} (letters, digits and . _ / + : = @ , - only)"]


def check_sbatch_value(value: str) -> list[str]:
    if value and _SBATCH_VALUE.match(value):
        return []
    bad = next((ch for ch in value if not _SBATCH_VALUE.match(ch)), None)
    why = f"it contains {_describe(bad)}" if bad else "it is empty"
    return [f"{value!r} cannot be passed to sbatch safely: {why}"]


def check_sbatch_path(path: str) -> list[str]:
    """Paths written into #SBATCH --output/--error and the srun command: submitit adds the
    %j/%t patterns itself, so a '%' of the user's would be read as a pattern."""
    for ch in path:
        if ch in "\n\r\0%\"'\\#" or ch.isspace():
            return [f"{path!r} cannot be used for Slurm's log files: it contains {_describe(ch)} "
                    f"(sbatch reads its directives without a shell; '%' starts a filename pattern)"]
    return []


def check_env_value(name: str, value: str) -> list[str]:
    if "\0" in value:
        return [f"{name}: the value contains a NUL byte, which no environment can hold"]
    return []


def shell_quote(value: str) -> str:
    return shlex.quote(value)


def quote_env_value(value: str) -> str:
    """One shell word whose value is `value` with each ${NAME} expanded and nothing else."""
    parts, last = [], 0
    for match in _VAR_REF.finditer(value):
        if match.start() > last:
            parts.append(shlex.quote(value[last:match.start()]))
        parts.append(f'"${{{match.group(1)}}}"')
        last = match.end()
    if last < len(value) or not parts:
        parts.append(shlex.quote(value[last:]))
    return "".join(parts)


def export_line(name: str, value: str) -> str:
    problems = check_env_name(name) + check_env_value(name, value)
    if problems:
        raise QuotingError("; ".join(problems))
    return f"export {name}={quote_env_value(value)}"
