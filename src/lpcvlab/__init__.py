"""lpcvlab: Hydra-configured, MLflow-tracked experiments for the LPCVC 2026 tracks."""

__version__ = "0.1.0"
