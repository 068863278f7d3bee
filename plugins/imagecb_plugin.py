"""Entry file Airflow's plugin loader finds in ``plugins/``; the plugin itself lives in the provider."""

from imagecb_provider.plugin import ImageCbPlugin

__all__ = ["ImageCbPlugin"]
