"""Readers for the deployment files, just enough to check them without a Docker engine."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Not `from conftest import ROOT`: with several conftest.py files that name is ambiguous.
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        """A JSON-array argument (`CMD ["a", "b"]`); the shell form is split like a shell would."""
        text = self.args.strip()
        return json.loads(text) if text.startswith("[") else shlex.split(text)


def dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and parser directives dropped."""
    out: list[Instruction] = []
    pending, start = "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        if not pending and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if pending and raw.lstrip().startswith("#"):  # a comment inside a continuation
            continue
        start = start or n
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + raw).strip().partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
        pending, start = "", 0
    return out


def healthcheck_command(instruction: Instruction) -> list[str]:
    """`HEALTHCHECK [--options] CMD [...]` -> the command."""
    _, _, command = instruction.args.partition("CMD ")
    return Instruction(instruction.line, "CMD", command).exec_form()


def dockerignored(root: Path, rel: str) -> bool:
    """Whether .dockerignore keeps `rel` out of the build context (last matching rule wins)."""
    excluded = False
    for raw in (root / ".dockerignore").read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").strip("/")
        if _matches(pattern, rel.strip("/")):
            excluded = not negate
    return excluded


def _matches(pattern: str, rel: str) -> bool:
    # A rule for a folder covers what is inside it; `**` crosses folders, `*` does not.
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
    regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    return any(re.fullmatch(regex, p) for p in prefixes) or fnmatch.fnmatchcase(rel, pattern)


# ---------------------------------------------------------------------------- compose

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(KeyError):
    """A `${VAR:?message}` whose variable is unset, as Compose refuses it."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`, `$$`."""

    def substitute(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        name, op, arg = m["name"] or m["bare"], m["op"] or "", m["arg"] or ""
        value = env.get(name)
        unset = value is None or (op.startswith(":") and value == "")
        if op.endswith("-") and unset:
            return arg
        if op.endswith("?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        return value or ""

    return _VAR.sub(substitute, text)


def interpolated(tree: Any, env: Mapping[str, str]) -> Any:
    """Every string of a parsed compose file interpolated, as Compose does after parsing."""
    if isinstance(tree, str):
        return interpolate(tree, env)
    if isinstance(tree, Mapping):
        return {k: interpolated(v, env) for k, v in tree.items()}
    if isinstance(tree, list):
        return [interpolated(v, env) for v in tree]
    return tree


def load_yaml(path: Path) -> Any:
    """YAML with anchors and `<<` merge keys resolved (as Compose resolves them)."""
    return yaml.safe_load(path.read_text())


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def bind_mounts(service: Mapping[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax volume whose source is a path."""
    for volume in service.get("volumes") or []:
        source, target, *mode = str(volume).split(":")
        if source.startswith((".", "/")):
            yield source, target, mode[0] if mode else "rw"


# ---------------------------------------------------------------------------- docs

_FENCE = re.compile(r"```(?:bash|sh|shell|console)?\n(.*?)```", re.S)


def shell_commands(markdown: str) -> Iterator[list[str]]:
    """Each command of the doc's shell code blocks, split into words, `$ ` prompts and
    environment assignments dropped; continuation lines joined, `&&` chains split."""
    for block in _FENCE.findall(markdown):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if not line or line.startswith("#"):
                continue
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words: list[str] = []
            for token in [*lexer, ";"]:
                if token not in (";", "&&", "||", "|", "&"):
                    words.append(token)
                    continue
                while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                    words.pop(0)
                if words:
                    yield words
                words = []
