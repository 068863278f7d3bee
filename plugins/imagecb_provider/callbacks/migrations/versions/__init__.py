"""Revisions of the imagecb provider's tables."""
