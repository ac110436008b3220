"""The result of a migration: our settings, and an account of every upstream setting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class MigrationError(ValueError):
    """An upstream setting whose value we cannot reproduce."""


@dataclass
class Migration:
    model: dict[str, Any] = field(default_factory=dict)  # our model YAML
    data: dict[str, Any] = field(default_factory=dict)  # our data YAML (nested like DataConfig)
    vae: dict[str, Any] | None = None  # --vae-config JSON (upstream "ae" names, read by WFVAEConfig.from_dict)
    flags: list[str] = field(default_factory=list)  # our launch flags
    used: list[tuple[str, str]] = field(default_factory=list)  # (upstream setting, where it went)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (upstream setting, why it is left out)

    def use(self, setting: str, target: str) -> None:
        self.used.append((setting, target))

    def drop(self, setting: str, reason: str) -> None:
        self.dropped.append((setting, reason))

    def set_data(self, setting: str, path: str, value: Any) -> None:
        """data[path] = value (path 'shape.fps'), recorded as carried over."""
        node = self.data
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        self.use(setting, f"data: {path} = {value!r}")

    def add_flag(self, setting: str, *flag: str) -> None:
        self.flags.extend(flag)
        self.use(setting, " ".join(flag) if flag else "(no flag)")

    def report(self) -> str:
        lines = [f"carried over ({len(self.used)}):"]
        lines += [f"  {s:<48} -> {t}" for s, t in self.used]
        lines.append(f"not carried over ({len(self.dropped)}):")
        lines += [f"  {s:<48} {r}" for s, r in self.dropped]
        return "\n".join(lines)


__all__ = ["Migration", "MigrationError"]
