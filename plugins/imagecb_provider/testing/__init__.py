"""Test helpers for the imagecb provider: an HTTP simulator of the image API and its pytest plugin."""
