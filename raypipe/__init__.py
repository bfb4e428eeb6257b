"""raypipe: self-supervised pretraining and fine-tuning sweeps from one YAML file."""

__version__ = "0.1.0"
