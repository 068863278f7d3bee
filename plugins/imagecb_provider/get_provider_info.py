"""Provider metadata read by Airflow's ProvidersManager (entry point ``apache_airflow_provider``)."""

from __future__ import annotations

from imagecb_provider import __version__

INTEGRATION = "Kie.ai Flux Kontext images"


def get_provider_info() -> dict:
    return {
        "package-name": "airflow-provider-imagecb",
        "name": "imagecb",
        "description": "Batch image generation against the kie.ai Flux Kontext asynchronous API: submit, "
        "wait by polling or callback, branch on failure codes, archive the files.",
        "versions": [__version__],
        "integrations": [
            {"integration-name": INTEGRATION, "external-doc-url": "https://docs.kie.ai/", "tags": ["service"]}
        ],
        "operators": [
            {
                "integration-name": INTEGRATION,
                "python-modules": [
                    "imagecb_provider.operators.generate",
                    "imagecb_provider.operators.branch",
                    "imagecb_provider.operators.archive",
                ],
            }
        ],
        "sensors": [{"integration-name": INTEGRATION, "python-modules": ["imagecb_provider.sensors.task"]}],
        "hooks": [{"integration-name": INTEGRATION, "python-modules": ["imagecb_provider.hooks.imagecb"]}],
        "triggers": [
            {
                "integration-name": INTEGRATION,
                "python-modules": [
                    "imagecb_provider.triggers.task",
                    "imagecb_provider.triggers.callback_event",
                ],
            }
        ],
        # The callback receiver's table, created by `airflow db migrate`.
        "db-managers": ["imagecb_provider.callbacks.db.CallbackDBManager"],
        "extra-links": ["imagecb_provider.links.GeneratedImageLink"],
        "task-decorators": [
            {"name": "imagecb", "class-name": "imagecb_provider.decorators.imagecb.imagecb_task"}
        ],
        "connection-types": [
            {
                "hook-class-name": "imagecb_provider.hooks.imagecb.ImageCbHook",
                "hook-name": "Kie.ai Flux Kontext images",
                "connection-type": "imagecb",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login", "extra"],
                    "relabeling": {"host": "Base URL", "password": "API key"},
                    "placeholders": {"host": "https://api.kie.ai (leave empty for the vendor's API)"},
                },
                "conn-fields": {
                    "callback_base_url": {
                        "label": "Callback base URL",
                        "description": "Public URL of this Airflow API server, for wait_mode='callback' "
                        "(e.g. https://airflow.example.com). Leave empty to poll only.",
                        "schema": {"type": ["string", "null"], "format": "url"},
                    },
                    "webhook_hmac_key": {
                        "label": "Webhook HMAC key",
                        "description": "The vendor's webhook HMAC key, used to verify signed callbacks.",
                        "schema": {"type": ["string", "null"], "format": "password"},
                    },
                    "timeout": {
                        "label": "Request timeout (seconds)",
                        "description": "Timeout of each API request.",
                        "schema": {"type": ["number", "null"], "minimum": 1, "default": 30},
                    },
                },
            }
        ],
    }
