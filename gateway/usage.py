"""Token usage as reported by a provider, normalised to one meaning across dialects."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Usage:
    """Billable token counts. A field is None when the provider did not report it.

    input_tokens:        prompt tokens billed at the input rate (cache reads and writes excluded)
    cached_input_tokens: prompt tokens served from cache (cache-read rate)
    cache_write_tokens:  prompt tokens written to cache (cache-write rate; Anthropic's 5-minute cache)
    output_tokens:       generated tokens including reasoning/thinking
    reasoning_tokens:    the reasoning part of output_tokens (information only)
    cache_write_1h_tokens: prompt tokens written to a 1-hour cache (its own, higher rate)
    service_tier:        the service tier the response says it was served at (prices differ)
    tool_calls:          calls of built-in (provider-run, per-call priced) tools, per tool kind
    """

    input_tokens: int | None = None
    cached_input_tokens: int | None = None
    cache_write_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    cache_write_1h_tokens: int | None = None
    service_tier: str | None = None
    tool_calls: tuple[tuple[str, int], ...] | None = None

    @property
    def reported(self) -> bool:
        """True when the provider reported at least the input or the output count."""
        return self.input_tokens is not None or self.output_tokens is not None
