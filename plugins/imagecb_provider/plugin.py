"""
The Airflow plugin side of the provider, for deployments that only put ``plugins/`` on the
path (no ``pip install``): it registers the same extra links the provider metadata declares.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from imagecb_provider.links import GeneratedImageLink


class ImageCbPlugin(AirflowPlugin):
    name = "imagecb"
    operator_extra_links = [GeneratedImageLink()]
