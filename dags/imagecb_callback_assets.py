"""
Archive images submitted outside Airflow, as soon as their callbacks arrive.

Another system submits generations with a callback URL made for the label ``studio``::

    python -m imagecb_provider.callbacks url --label studio

Each callback the receiver records for that URL becomes one event of the asset
``imagecb_studio_callbacks`` (an ``ImageCallbackEventTrigger`` watches it in the triggerer), and
every run of this DAG archives the images of the events that triggered it. Failed generations
are passed over by the archive task. Parsing this file makes no network or database call.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from airflow.sdk import Asset, AssetWatcher, Param, dag, task

from imagecb_provider.operators.archive import ImageArchiveOperator
from imagecb_provider.triggers.callback_event import ImageCallbackEventTrigger, result_from_event

LABEL = "studio"

# [START howto_callback_asset_watcher]
studio_callbacks = Asset(
    "imagecb_studio_callbacks",
    watchers=[
        AssetWatcher(
            name="imagecb_studio_callbacks_watcher",
            trigger=ImageCallbackEventTrigger(imagecb_conn_id="imagecb_default", label=LABEL),
        )
    ],
)
# [END howto_callback_asset_watcher]


@dag(
    dag_id="imagecb_callback_assets",
    schedule=[studio_callbacks],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["imagecb", "example"],
    doc_md=__doc__,
    default_args={"owner": "imagecb", "retries": 2},
    params={
        "archive_root": Param("/tmp/imagecb-callbacks", type="string", description="Where files are kept"),
    },
)
def imagecb_callback_assets():
    # [START howto_callback_assets_archive]
    @task
    def results_from_events(triggering_asset_events: Any = None) -> list[dict[str, Any]]:
        """Turn the payloads of the triggering asset events into result dicts."""
        payloads = [
            event.extra.get("payload")
            for events in (triggering_asset_events or {}).values()
            for event in events
            if event.extra.get("from_trigger")
        ]
        return [result_from_event(payload) for payload in payloads if payload]

    ImageArchiveOperator(
        task_id="archive",
        results=results_from_events(),
        destination="{{ params.archive_root }}/" + LABEL,
    )
    # [END howto_callback_assets_archive]


imagecb_callback_assets()
