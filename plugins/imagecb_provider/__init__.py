"""Apache Airflow provider for the kie.ai Flux Kontext asynchronous image API."""

__version__ = "0.1.0"
