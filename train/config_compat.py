"""Compatibility of training configs across versions and resumes: keys that were removed
(and what became of them), and which keys of a checkpoint's config must match the config
that resumes it (:func:`config_diff`, used by the preflight check)."""

from __future__ import annotations

from typing import Any

# Keys older versions had, the value whose behaviour is now built in (None: any value is
# compatible), and what became of them. A config that sets one fails with this note; a
# checkpoint that recorded one resumes if its value is compatible.
REMOVED_KEYS: dict[str, tuple[Any, str]] = {
    "gate.budget_to_hidden": (
        True,
        "removed: every learned router now reads the budget in its hidden layer (the old `true`)",
    ),
    "gate.router_input_init": (
        None,
        "removed: an ablation knob (docs/training.md, Finding); the dynamic router's init is built in",
    ),
}


def removed_key_note(key: str) -> str | None:
    """The note for a removed dotted key (``gate.budget_to_hidden``), or None."""
    entry = REMOVED_KEYS.get(key)
    return None if entry is None else f"{key} was {entry[1]}; delete it from the config"


# Sections whose change makes a checkpoint incompatible with the config resuming it.
RESUME_KEYS = ("task", "model", "data", "lm", "gate", "optim", "regularizer", "distill", "seed", "stages")


_MISSING = object()


def config_diff(
    saved: dict[str, Any],
    current: dict[str, Any],
    keys: tuple[str, ...] = RESUME_KEYS,
    defaults: dict[str, Any] | None = None,
) -> list[str]:
    """Dotted keys whose values differ between two config dicts (only under ``keys``).

    A key absent from ``saved`` (a field added after the checkpoint was written) matches
    when the current value equals its entry in ``defaults``: new fields default to the old
    behaviour, so such a checkpoint can still be resumed. A key in ``saved`` that was
    removed since (:data:`REMOVED_KEYS`) matches when its value is the built-in behaviour.
    """
    out: list[str] = []

    def walk(a: Any, b: Any, default: Any, prefix: str) -> None:
        if prefix in REMOVED_KEYS and b is None and a is not _MISSING:
            compatible, note = REMOVED_KEYS[prefix]
            if compatible is not None and a != compatible:
                out.append(f"{prefix} (checkpoint: {a!r}; this key was {note}, so the run cannot continue)")
            return
        if isinstance(a, dict) and isinstance(b, dict):
            dflt = default if isinstance(default, dict) else {}
            for k in sorted(set(a) | set(b)):
                walk(a.get(k, _MISSING), b.get(k), dflt.get(k, _MISSING), f"{prefix}.{k}" if prefix else k)
        elif a is _MISSING:
            if default is _MISSING or b != default:
                out.append(f"{prefix} (checkpoint: not set, now: {b!r})")
        elif a != b:
            out.append(f"{prefix} (checkpoint: {a!r}, now: {b!r})")

    defaults = defaults or {}
    for key in keys:
        walk(saved.get(key), current.get(key), defaults.get(key, _MISSING), key)
    return out
