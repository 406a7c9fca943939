"""Resuming a run only with the configuration it was started with.

A run's configuration is a dataclass (or several); its checkpoint and record store them as
dictionaries. :func:`config_changes` lists what differs, :func:`check_same_config` refuses to
resume or reread a run whose configuration changed, except in the fields a run declares
result-neutral (how often it saves or logs, how long it trains when it may be extended).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional

__all__ = ["config_changes", "check_same_config"]


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # tuples and lists compare equal


def _default(config_class: Optional[type], key: str) -> Any:
    if config_class is None:
        return dataclasses.MISSING
    for field in dataclasses.fields(config_class):
        if field.name == key:
            if field.default is not dataclasses.MISSING:
                return field.default
            if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return field.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def config_changes(stored: Dict[str, Any], current: Dict[str, Any], config_class: Optional[type] = None,
                   ignore: FrozenSet[str] = frozenset()) -> List[str]:
    """The settings in which ``current`` differs from ``stored`` (both ``asdict`` of
    ``config_class``), as ``"key: old -> new"``. A key present on one side only counts as unchanged
    when the other side would have the dataclass default (a field added to monoflow since the
    checkpoint was written); keys in ``ignore`` are skipped."""
    changes = []
    for key in sorted(set(stored) | set(current)):
        if key in ignore:
            continue
        old = stored.get(key, _default(config_class, key))
        new = current.get(key, _default(config_class, key))
        if old is dataclasses.MISSING or new is dataclasses.MISSING:
            changes.append(f"{key}: {'absent' if old is dataclasses.MISSING else _plain(old)} -> "
                           f"{'absent' if new is dataclasses.MISSING else _plain(new)}")
        elif _plain(old) != _plain(new):
            changes.append(f"{key}: {_plain(old)} -> {_plain(new)}")
    return changes


def check_same_config(changes: List[str], where: Path, advice: str) -> None:
    """Raise ``ValueError`` naming ``changes`` (from :func:`config_changes`) if there are any."""
    if changes:
        raise ValueError(f"{where} holds a run with a different configuration ({'; '.join(changes)}); {advice}")
