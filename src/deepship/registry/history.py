"""What the event log tells: an alias's past targets (rollback walks them back) and a version's lineage.

Backend-agnostic: everything here goes through the Registry interface.
"""

from __future__ import annotations

from typing import Any

from deepship.errors import ConfigError
from deepship.registry.base import Registry, VersionInfo

MOVES = ("alias", "promote", "rollback")  # the events that move an alias


def alias_stack(events: list[dict[str, Any]], alias: str) -> list[int]:
    """The alias's targets as a stack, current last: a move pushes its target, a rollback pops the top.
    So v1 -> v2 -> v3 gives [1, 2, 3]; one rollback [1, 2]; a second [1]."""
    stack: list[int] = []
    for event in events:
        if event.get("alias") != alias or event.get("event") not in MOVES:
            continue
        if not stack and event.get("from") is not None:
            stack.append(event["from"])
        if event["event"] == "rollback" and len(stack) >= 2 and stack[-2] == event["to"]:
            stack.pop()
        else:
            stack.append(event["to"])
    return stack


def rollback(registry: Registry, name: str, alias: str, actor: str | None = None) -> tuple[int, int]:
    """Point `alias` back at its previous target from the event log; returns (from, to)."""
    registry.check_alias(alias)
    with registry.lock(name):
        current = registry.alias_target(name, alias)
        if current is None:
            raise ConfigError(f"{name}@{alias}: no such alias (aliases: {sorted(registry.aliases(name)) or 'none'})")
        stack = alias_stack(registry.events(name), alias)
        if not stack or stack[-1] != current:
            raise ConfigError(f"{name}@{alias}: points at version {current} but its event history ends at "
                              f"{stack[-1] if stack else 'nothing'}; set it explicitly with `deepship registry alias`")
        if len(stack) < 2:
            raise ConfigError(f"{name}@{alias}: version {current} is the first target it ever had; nothing to roll "
                              "back to (set another with `deepship registry alias`)")
        previous = stack[-2]
        registry.set_alias(name, alias, previous, event="rollback", actor=actor)
    return current, previous


def build_lineage(registry: Registry, info: VersionInfo) -> dict[str, Any]:
    """data fingerprint -> training config -> run dir -> package -> registry version -> alias history -> servers."""
    from deepship.runtime.package import read_manifest

    manifest = read_manifest(info.path)
    events = registry.events(info.name)
    return {
        "model": info.name,
        "version": info.version,
        "data": {"fingerprint": info.lineage.get("data_fingerprint"),
                 "train": (manifest.get("training_data") or {}).get("source"),
                 "num_samples": (manifest.get("training_data") or {}).get("num_samples")},
        "training": {"config_sha256": info.lineage.get("config_sha256"), "config": manifest.get("config"),
                     "run_dir": info.lineage.get("run_dir"), "run_name": info.lineage.get("run_name"),
                     "metrics": manifest.get("metrics")},
        "package": {"sha256": info.sha256, "model_version": manifest.get("model_version"),
                    "source": info.lineage.get("package"), "path": str(info.path),
                    "format_version": manifest.get("format_version")},
        "registry": {"uri": registry.uri, "version": info.version, "created": info.created,
                     "registered_by": info.lineage.get("registered_by"), "aliases_now": info.aliases,
                     "extra": {k: v for k, v in info.lineage.items() if k not in LINEAGE_KEYS}},
        "alias_history": [e for e in events if e.get("event") in (*MOVES, "promote_refused")
                          and info.version in (e.get("to"), e.get("from"), e.get("candidate", {}).get("version"))],
        "deployments": [{k: v for k, v in e.items() if k != "event"}  # host, port, pid, ts, alias, ...
                        for e in events if e.get("event") == "deploy" and e.get("version") == info.version],
    }


LINEAGE_KEYS = {"package", "model_version", "run_dir", "run_name", "data_fingerprint", "config_sha256", "registered_by"}
