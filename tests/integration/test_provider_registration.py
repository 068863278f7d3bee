"""The installed distribution is a real Airflow provider: its connection type reaches the UI."""

from __future__ import annotations

import importlib.metadata

import pytest


@pytest.fixture(scope="module")
def providers_manager():
    from airflow.providers_manager import ProvidersManager

    return ProvidersManager()


def test_distribution_declares_the_provider_entry_point():
    entry_points = importlib.metadata.entry_points(group="apache_airflow_provider")
    ours = [ep for ep in entry_points if ep.value.startswith("imagecb_provider.")]
    assert len(ours) == 1
    assert ours[0].load()()["package-name"] == "airflow-provider-imagecb"


def test_providers_manager_lists_the_provider(providers_manager):
    assert "airflow-provider-imagecb" in providers_manager.providers


def test_connection_type_is_registered_with_its_hook():
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    hook_info = ProvidersManagerTaskRuntime().hooks["imagecb"]
    assert hook_info is not None
    assert hook_info.hook_class_name == "imagecb_provider.hooks.imagecb.ImageCbHook"
    assert hook_info.connection_id_attribute_name == "imagecb_conn_id"


def test_connection_form_labels_fields_and_masks_the_hmac_key(providers_manager):
    behaviour = providers_manager.field_behaviours["imagecb"]
    assert {"login", "schema", "port", "extra"} <= set(behaviour["hidden_fields"])
    assert behaviour["relabeling"] == {"host": "Base URL", "password": "API key"}
    widgets = providers_manager.connection_form_widgets
    assert widgets["extra__imagecb__webhook_hmac_key"].is_sensitive
    assert not widgets["extra__imagecb__callback_base_url"].is_sensitive
    assert widgets["extra__imagecb__timeout"].field["schema"]["type"] == ["number", "null"]
