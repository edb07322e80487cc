"""vicuna: train, serve and evaluate Vicuna-style chat assistants."""

__version__ = "0.1.0"
