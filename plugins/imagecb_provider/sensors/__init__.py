"""Sensors of the imagecb provider."""
