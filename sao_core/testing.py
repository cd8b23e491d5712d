"""Helpers for the tests and benchmarks; no production module imports this one (an import contract).

from sao_core.testing import build_tiny_llama, build_tiny_tokenizer
"""

from __future__ import annotations

from sao_core.tiny_llama import build_tiny_llama, build_tiny_tokenizer

__all__ = ["build_tiny_llama", "build_tiny_tokenizer"]
