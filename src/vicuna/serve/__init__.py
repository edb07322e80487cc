"""Serving: engine, model workers, controller, OpenAI-compatible API (see docs/serving.md)."""
