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
        # The API server app, the run tab and the global extra links, as official providers declare
        # theirs. Airflow loads provider-declared plugins only with [core] lazy_discover_providers
        # = False; by default it finds plugins through the ``airflow.plugins`` entry point.
        "plugins": [{"name": "imagecb", "plugin-class": "imagecb_provider.plugin.ImageCbPlugin"}],
        # The [imagecb] options, shown by `airflow config list` (the sensitive one masked).
        "config": {
            "imagecb": {
                "description": "The imagecb provider's callback receiver and contact sheet.",
                "options": {
                    "callback_signing_keys": {
                        "description": "Keys that sign callback URLs: kid:secret pairs, comma-separated "
                        "(secrets of 32 characters or more). The first signs, all verify: add a new key "
                        "after the old one, move it first, drop the old one once its URLs have expired. "
                        "Empty: keys derived from [core] fernet_key.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "sensitive": True,
                        "example": "k2:<32+ random characters>,k1:<32+ random characters>",
                        "default": "",
                    },
                    "revoked_asset_labels": {
                        "description": "Asset callback labels whose URLs are refused (comma-separated).",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "partner-a,old-label",
                        "default": "",
                    },
                    "asset_callback_quota": {
                        "description": "Asset callbacks recorded per connection and label within the window; "
                        "the next is answered 429.",
                        "version_added": "0.2.0",
                        "type": "integer",
                        "example": "10000",
                        "default": "10000",
                    },
                    "asset_callback_quota_window": {
                        "description": "The quota's sliding window, in seconds.",
                        "version_added": "0.2.0",
                        "type": "integer",
                        "example": "86400",
                        "default": "86400",
                    },
                    "archive_roots": {
                        "description": "Where the contact sheet may read reports and images: local folders, "
                        "s3:// and gs:// prefixes, comma-separated. Empty: the sheet is not served.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "/data/imagecb-archive,s3://my-bucket/imagecb",
                        "default": "",
                    },
                },
            }
        },
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
                    "file_hosts": {
                        "label": "File hosts",
                        "description": "Comma-separated hosts generated files may be downloaded from, "
                        "besides the API host and, for the vendor's API, tempfile.aiquickdraw.com and "
                        "*.r2.cloudflarestorage.com (e.g. files.example.com, *.cdn.example.com). "
                        "https only; prefix a host with http:// to allow plain http for it.",
                        "schema": {"type": ["string", "null"]},
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
