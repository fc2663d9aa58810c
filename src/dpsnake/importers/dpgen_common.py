"""The state of one DP-GEN import: the param.json being read, which of its keys were used, the table of
what is not carried over (key, value, why) and, per config section, the DP-GEN keys its values came from.

Nothing is dropped silently: a key is either marked used (``get``/``take``) or ends up in the table;
``leftovers`` puts every top-level key nobody read into it. Keys that start with ``_`` are DP-GEN's
comments (``_comment``, ``_idx``) and are skipped.
"""

from __future__ import annotations

import json
import pathlib

from dpsnake.errors import UserError


def short(value, limit: int = 70) -> str:
    """A value as one short line for the table."""
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Context:
    """One param.json being imported (``path``: the file, ``param``: its content)."""

    def __init__(self, param: dict, path: pathlib.Path):
        self.param = param
        self.path = pathlib.Path(path)
        self.base = self.path.resolve().parent  # DP-GEN runs from the folder of param.json
        self.used: set[str] = set()
        self.notes: list[tuple[str, str, str]] = []
        self.sources: dict[str, list[str]] = {}
        self.warnings: list[str] = []

    # ---- reading keys
    def has(self, key: str) -> bool:
        return key in self.param

    def get(self, key: str, default=None):
        """The value of a top-level key (marked used), or ``default``."""
        self.used.add(key)
        return self.param.get(key, default)

    def require(self, key: str):
        if key not in self.param:
            raise self.error(key, "required by DP-GEN, missing")
        return self.get(key)

    def error(self, key: str, what: str) -> UserError:
        """A one-line error naming the file and the key."""
        return UserError(f"{self.path}: {key}: {what}")

    def resolve(self, path: str, prefix: str | None = None) -> pathlib.Path:
        """A path of param.json as DP-GEN reads it: ``prefix`` joined in front, relative to param.json's folder."""
        p = pathlib.Path(prefix or "") / str(path)
        return p if p.is_absolute() else (self.base / p)

    # ---- the table and the sources
    def note(self, key: str, value, why: str) -> None:
        """A key (or part of one) that is not carried over, with the reason."""
        self.notes.append((key, short(value), why))

    def source(self, section: str, line: str) -> None:
        """Record where a value of config section ``section`` came from ("train.numb_models <- numb_models")."""
        self.sources.setdefault(section, []).append(line)

    def leftovers(self) -> None:
        """Every top-level key nobody read goes into the table."""
        for key, value in self.param.items():
            if key not in self.used and not key.startswith("_"):
                self.note(key, value, "no dpsnake equivalent (the importer does not know this key)")
                self.used.add(key)

    def table(self) -> str:
        """The "not carried over" table as aligned text lines (empty string when nothing)."""
        if not self.notes:
            return ""
        rows = [("key", "value", "why")] + [(k, short(v, 40), w) for k, v, w in self.notes]
        w0 = min(max(len(r[0]) for r in rows), 48)
        w1 = min(max(len(r[1]) for r in rows), 40)
        lines = [f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}" for r in rows]
        lines.insert(1, f"{'-' * w0}  {'-' * w1}  {'-' * 20}")
        return "\n".join(lines)


def unused_subkeys(ctx: Context, key: str, mapping: dict, known: set[str], why: str) -> None:
    """Table rows for the entries of the dict ``mapping`` (found under ``key``) not in ``known``."""
    for sub, value in (mapping or {}).items():
        if sub not in known and not str(sub).startswith("_"):
            ctx.note(f"{key}.{sub}", value, why)
