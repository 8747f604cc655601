"""Ecliptica: train and compare LLM alignment methods fairly and reproducibly."""

__version__ = "0.1.0"
