"""Callbacks of the imagecb provider."""
