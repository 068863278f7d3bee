"""
Quick start: the provider's operators on one image each way.

* ``hero``: submit and wait in the triggerer, then archive the files;
* ``submit`` + ``wait``: submit without waiting, and wait with the sensor.
"""

from __future__ import annotations

# [START howto_quickstart]
from datetime import datetime

from airflow.sdk import Param, dag

from imagecb_provider.operators.archive import ImageArchiveOperator
from imagecb_provider.operators.generate import ImageGenerateOperator
from imagecb_provider.sensors.task import ImageTaskSensor


@dag(
    dag_id="imagecb_quickstart",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["imagecb", "example"],
    doc_md=__doc__,
    default_args={"owner": "imagecb", "retries": 2},
    params={
        "archive_root": Param("/tmp/imagecb-quickstart", type="string", description="Where files are kept"),
        "poll_interval": Param(30, type="number", minimum=0.1, description="Seconds between status calls"),
    },
)
def imagecb_quickstart():
    # [START howto_operator_generate]
    hero = ImageGenerateOperator(
        task_id="hero",
        prompt="a lighthouse on a cliff at dawn, watercolor",
        aspect_ratio="4:3",
        output_format="png",
        poll_interval="{{ params.poll_interval }}",
    )
    # [END howto_operator_generate]
    # [START howto_operator_archive]
    ImageArchiveOperator(
        task_id="keep", results=hero.output, destination="{{ params.archive_root }}/{{ ds }}"
    )
    # [END howto_operator_archive]

    # [START howto_sensor]
    submitted = ImageGenerateOperator(
        task_id="submit", prompt="a paper crane on a wooden desk, macro shot", wait_for_completion=False
    )
    ImageTaskSensor(task_id="wait", remote_task_id=submitted.output, poke_interval=5)
    # [END howto_sensor]


imagecb_quickstart()
# [END howto_quickstart]
