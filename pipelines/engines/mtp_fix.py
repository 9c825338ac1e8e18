"""A narrow fix that lets transformers 5.23 build and run the Gemma 4 Unified MTP assistant.

As released, `Gemma4UnifiedTextConfig.kv_sharing_modes` (a) raises "The set of layer types producing a cache is
different than the set of layer types using them" for the assistant, whose config marks every layer KV-shared, and
(b) marks no layer "store" on a target with `num_kv_shared_layers == 0`, so the target returns no shared KV states
and assisted generation fails with `KeyError: 'full_attention'`.

The fix: the assistant reuses the target's KV on every layer; the target stores the KV of the last layer of each
layer type. Everything else keeps the released behaviour. It is applied only to the versions known to need it, and
only when the bug still reproduces, so an upstream fix retires it.
"""

from __future__ import annotations

from packaging.version import Version

AFFECTED = (Version("5.23.0"), Version("5.24.0"))  # [first, end) of the transformers releases that need it

_applied = False


def _fixed_modes(config) -> list[str | None]:
    layers = config.num_hidden_layers
    if config.num_kv_shared_layers >= layers:
        return ["reuse"] * layers
    if config.num_kv_shared_layers == 0:
        modes: list[str | None] = [None] * layers
        for layer_type in set(config.layer_types):
            last = layers - 1 - config.layer_types[::-1].index(layer_type)
            modes[last] = "store"
        return modes
    return _released(config)


def _released(config):
    return _RELEASED_PROPERTY.fget(config)


def needs_fix() -> bool:
    if _applied:  # the probe below would meet the fixed property; it was needed when it was installed
        return True
    import transformers
    from transformers import Gemma4UnifiedTextConfig

    version = Version(transformers.__version__)
    if not (AFFECTED[0] <= version < AFFECTED[1]):
        return False
    probe = Gemma4UnifiedTextConfig(
        num_hidden_layers=2,
        num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        hidden_size=8,
        intermediate_size=8,
        vocab_size=8,
    )
    try:
        _ = probe.kv_sharing_modes
    except ValueError:
        return True
    return False


def apply() -> bool:
    """Install the fix if this transformers needs it. Idempotent; returns whether the fix is active."""
    global _applied, _RELEASED_PROPERTY
    if _applied:
        return True
    if not needs_fix():
        return False
    from transformers import Gemma4UnifiedTextConfig

    _RELEASED_PROPERTY = Gemma4UnifiedTextConfig.__dict__["kv_sharing_modes"]
    Gemma4UnifiedTextConfig.kv_sharing_modes = property(_fixed_modes)
    _applied = True
    return True


def remove() -> None:
    """Restore the released behaviour (for tests that prove the fix is what makes speculation work)."""
    global _applied
    if _applied:
        from transformers import Gemma4UnifiedTextConfig

        Gemma4UnifiedTextConfig.kv_sharing_modes = _RELEASED_PROPERTY
        _applied = False


_RELEASED_PROPERTY = None
