"""Hugging Face -> mlx_gemma4 checkpoint conversion (ships as `mlx_gemma4.convert`)."""

from .write import convert

__all__ = ["convert"]
