"""A model's entry written into a config file by hand's rules: the file's text, comments and
order kept, the entry added at the end of `models:` (or put in place of the entry of the same
id, when asked), the whole result validated as the server will read it before anything is
written, and the previous file kept beside it as a backup."""
from __future__ import annotations

import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.cli.prepare_avatar import yaml_scalar
from pipeline.config import ConfigError, parse_config
from pipeline.runtime.files import write_atomic

_MODELS = re.compile(r"^models\s*:\s*(#.*)?$")
_EMPTY_MODELS = re.compile(r"^models\s*:\s*(\{\s*\}|null|~)\s*(#.*)?$")
_TOP_LEVEL = re.compile(r"^[^\s#]")


class EntryError(Exception):
    """The config cannot take the entry; the message says why in one line."""


@dataclass(frozen=True)
class ModelEntry:
    """A `models:` entry; paths as they are written (relative to models_root, or absolute)."""

    model_id: str
    fields: dict[str, object]

    def block(self, indent: int = 2) -> str:
        """The entry's lines, its id indented by `indent` spaces, ready under `models:`."""
        lines = [f"{' ' * indent}{yaml_scalar(self.model_id)}:"]
        for key, value in self.fields.items():
            lines.append(f"{' ' * (indent + 2)}{key}: {_scalar(value)}")
        return "\n".join(lines) + "\n"


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, int) else yaml_scalar(str(value))


@dataclass(frozen=True)
class ConfigEdit:
    """A checked edit of a config file, written by `write`."""

    config: Path
    text: str
    mode: int

    def write(self) -> Path:
        """Write the edited config (the previous one kept beside it); returns the backup."""
        backup = _backup_name(self.config)
        try:
            shutil.copy2(self.config, backup)
            write_atomic(self.config, self.text.encode(), mode=self.mode)
        except OSError as exc:
            raise EntryError(f"cannot write {self.config}: {exc}") from None
        return backup


def plan_entry(config: Path, entry: ModelEntry, force: bool = False) -> ConfigEdit:
    """The edit that adds `entry` to `config` (replacing the same id's only with `force`),
    checked as the server will read the result; EntryError when it cannot be made."""
    config = Path(config)
    try:
        text = config.read_text()
        mode = stat.S_IMODE(config.stat().st_mode)
    except OSError as exc:
        raise EntryError(f"cannot read {config}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise EntryError(f"{config} is not valid YAML: {exc}") from None
    models = raw.get("models") if isinstance(raw, dict) else None
    exists = isinstance(models, dict) and entry.model_id in models
    if exists and not force:
        raise EntryError(f"model '{entry.model_id}' is already in {config}; --force replaces it")
    edited = _edited(text, entry, exists)
    try:
        cfg = parse_config(yaml.safe_load(edited), base_dir=config.resolve().parent)
    except (ConfigError, yaml.YAMLError) as exc:
        raise EntryError(f"{config} would not validate with the entry: {exc}") from None
    if entry.model_id not in cfg.models:
        raise EntryError(f"could not place the entry under models: in {config}; add it by hand")
    return ConfigEdit(config, edited, mode)


def _edited(text: str, entry: ModelEntry, replace: bool) -> str:
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    start = next((i for i, line in enumerate(lines) if _MODELS.match(line)), None)
    if start is None:
        empty = next((i for i, line in enumerate(lines) if _EMPTY_MODELS.match(line)), None)
        if empty is not None:  # "models: {}": the block takes its place
            return "".join(lines[:empty]) + "models:\n" + entry.block() + "".join(lines[empty + 1:])
        if any(re.match(r"^models\s*:", line) for line in lines):
            raise EntryError("the config's models: is written inline; add the entry by hand")
        return "".join(lines) + "\nmodels:\n" + entry.block()
    end = start + 1  # the models block: up to the next top-level key
    while end < len(lines) and not _TOP_LEVEL.match(lines[end]):
        end += 1
    children = [i for i in range(start + 1, end) if lines[i].strip()
                and not lines[i].lstrip().startswith("#")]
    indent = len(lines[children[0]]) - len(lines[children[0]].lstrip()) if children else 2
    block = entry.block(indent)
    if replace:
        first = next((i for i in children if _indent(lines[i]) == indent
                      and yaml.safe_load(lines[i]) in ({entry.model_id: None},)), None)
        if first is None:
            raise EntryError(f"could not find model '{entry.model_id}' under models:; "
                             "replace it by hand")
        last = next((i for i in children if i > first and _indent(lines[i]) <= indent), end)
        while last > first + 1 and (not lines[last - 1].strip()
                                    or lines[last - 1].lstrip().startswith("#")):
            last -= 1  # the blank lines and comments before the next entry stay with it
        return "".join(lines[:first]) + block + "".join(lines[last:])
    insert = children[-1] + 1 if children else start + 1
    return "".join(lines[:insert]) + block + "".join(lines[insert:])


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _backup_name(config: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = config.with_name(f"{config.name}.{stamp}.bak")
    n = 1
    while backup.exists():
        n += 1
        backup = config.with_name(f"{config.name}.{stamp}-{n}.bak")
    return backup
