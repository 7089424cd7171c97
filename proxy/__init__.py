"""callgate: an OpenAI-compatible reverse proxy that gates the tool calls a model makes."""

__version__ = "0.1.0"
