"""
The provider's pages inside the Airflow UI.

A DAG run's **contact sheet** (a tab of the run page: every image of the run, every prompt left
without one and why), the files it shows, and the extra links that lead there. They are served by
the provider's FastAPI app on the API server under ``/imagecb``, behind Airflow's own
authentication: see :mod:`imagecb_provider.ui.router` and ``docs/ui.md``. Reports and images are
read only under the archive roots an administrator configured (:mod:`imagecb_provider.ui.roots`).
"""
