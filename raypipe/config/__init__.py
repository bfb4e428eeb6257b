"""The pipeline config: one strict, typed tree loaded from YAML, with dotted overrides.

Every problem is reported with its key path, all at once, before anything starts. Imports no
torch and no Ray, so `raypipe validate` is fast. The schema is in `schema.py`, the rules across
keys in `rules.py`, loading in `loading.py`.
"""

from raypipe.config.loading import apply_overrides, load_config, parse_config, to_yaml
from raypipe.config.schema import (
    RUN_ONLY,
    TUNABLE,
    ConfigError,
    DataConfig,
    Distribution,
    FinetuneConfig,
    LabeledData,
    LabeledSource,
    ModelConfig,
    PipelineConfig,
    PreprocessConfig,
    PretrainConfig,
    ProbeConfig,
    ScalingConfig,
    Source,
    SweepConfig,
    TokenizerConfig,
    TrackingConfig,
    run_only_exclusions,
)

__all__ = [
    "RUN_ONLY", "TUNABLE", "ConfigError", "DataConfig", "Distribution", "FinetuneConfig",
    "LabeledData", "LabeledSource", "ModelConfig", "PipelineConfig", "PreprocessConfig",
    "PretrainConfig", "ProbeConfig", "ScalingConfig", "Source", "SweepConfig", "TokenizerConfig",
    "TrackingConfig", "apply_overrides", "load_config", "parse_config", "run_only_exclusions",
    "to_yaml",
]  # fmt: skip
