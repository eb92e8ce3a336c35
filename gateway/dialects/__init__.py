"""Wire dialects, one module each, all behind `gateway.dialects.base.Dialect`."""

from __future__ import annotations

from gateway.dialects.anthropic import AnthropicDialect
from gateway.dialects.base import Dialect
from gateway.dialects.gemini import GeminiDialect
from gateway.dialects.http import HttpDialect
from gateway.dialects.openai import OpenAIDialect


def all_dialects() -> dict[str, Dialect]:
    """A fresh name -> dialect table (dialects are stateless)."""
    return {"openai": OpenAIDialect(), "anthropic": AnthropicDialect(), "gemini": GeminiDialect(),
            "http": HttpDialect()}
