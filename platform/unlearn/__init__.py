"""ray-unlearn: machine unlearning at cluster scale (Ray Train, Ray Tune, MLflow)."""

__version__ = "0.1.0"
