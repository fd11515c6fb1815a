"""What tokens cost: a model's list prices (config `models.<name>.price`, USD per million
tokens) turned into dollars, the Batch API's discount included. Used by the budgets that
stop a step and by `synthpert plan`."""

from __future__ import annotations

from dataclasses import dataclass

MILLION = 1_000_000


@dataclass(frozen=True)
class Price:
    input: float
    cached_input: float
    output: float
    batch_discount: float
    date: str
    source: str

    @classmethod
    def of(cls, price: dict | None) -> Price | None:
        """The price of a completed `models:` entry's `price` (None when it has none)."""
        if price is None:
            return None
        cached = price.get("cached_input")
        return cls(
            input=float(price["input"]),
            cached_input=float(price["input"] if cached is None else cached),
            output=float(price["output"]),
            batch_discount=float(price.get("batch_discount", 0.5)),
            date=str(price["date"]),
            source=str(price["source"]),
        )

    def usd(self, prompt_tokens: float, completion_tokens: float, cached_tokens: float = 0, batch: bool = False) -> float:
        """Dollars for one request's (or many requests') tokens; `cached_tokens` are the part
        of the prompt tokens billed at the cached-input price."""
        cached = min(cached_tokens, prompt_tokens)
        cost = ((prompt_tokens - cached) * self.input + cached * self.cached_input + completion_tokens * self.output) / MILLION
        return cost * (1.0 - self.batch_discount) if batch else cost
