"""Triggers of the imagecb provider."""
