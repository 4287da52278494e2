"""The named configurations moved next to the config (raygpt.presets); this name stays
for scripts that import it."""
from raygpt.presets import DEFAULT_PRESET, PRESETS, get_preset  # noqa: F401
