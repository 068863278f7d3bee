"""Hooks of the imagecb provider."""
