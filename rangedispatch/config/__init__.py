"""Configuration: schema dataclasses, Hydra composition, validation."""

from rangedispatch.config.loader import compose_config, config_dir, hardware_profiles, load_config, to_schema
from rangedispatch.config.schema import (
    CompileConfig,
    DispatchConfig,
    FusionConfig,
    HardwareConfig,
    RangeDispatchConfig,
    TierThresholds,
)

__all__ = [
    "CompileConfig", "DispatchConfig", "FusionConfig", "HardwareConfig", "RangeDispatchConfig", "TierThresholds",
    "compose_config", "config_dir", "hardware_profiles", "load_config", "to_schema",
]
