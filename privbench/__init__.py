"""privbench: privacy evaluation harness for split learning and collaborative inference."""

__version__ = "0.1.0"
