"""YAML presets (kv/) and sweep definitions (sweeps/), shipped inside the package."""
