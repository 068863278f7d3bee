"""Operators of the imagecb provider."""
