"""DEO: dual-teacher distillation for multispectral Earth observation, as a pipeline."""

__version__ = "0.1.0"
