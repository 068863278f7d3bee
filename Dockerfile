# Airflow with the imagecb provider, its DAGs and data. Build: docker build -t imagecb-airflow .
FROM apache/airflow:3.3.2-python3.12

COPY --chown=airflow:root requirements.txt /opt/imagecb/requirements.txt
RUN pip install --no-cache-dir -r /opt/imagecb/requirements.txt

COPY --chown=airflow:root pyproject.toml README.md /opt/imagecb/
COPY --chown=airflow:root plugins/ /opt/imagecb/plugins/
RUN pip install --no-cache-dir --no-deps /opt/imagecb

COPY --chown=airflow:root dags/ /opt/airflow/dags/
COPY --chown=airflow:root include/ /opt/airflow/include/
