#!/usr/bin/env bash
# make airflow: a full local Airflow with the UI (`airflow standalone`: API server, scheduler,
# triggerer, DAG processor) running this project's DAGs and plugins against the simulator.
#
# PostgreSQL on 127.0.0.1:5432 is used when it answers (SQLite breaks under a real batch: see
# shared/AIRFLOW-NOTES.md); otherwise SQLite with a parallelism it can bear. Ctrl-C stops all.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$ROOT/${VENV:-.venv}/bin:$PATH"   # standalone calls `airflow` by name

export AIRFLOW_HOME=${AIRFLOW_HOME:-$ROOT/.airflow}
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL=${AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL:-30}
mkdir -p "$AIRFLOW_HOME"

free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_busy() { python -c 'import socket,sys; s=socket.socket(); sys.exit(0 if s.connect_ex(("127.0.0.1",int(sys.argv[1])))==0 else 1)' "$1"; }

# --- the metadata database -------------------------------------------------------------------
PG_DB=${IMAGECB_PG_DB:-imagecb_airflow}
if python - "$PG_DB" <<'PY'
import sys
import psycopg2
try:
    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3)
except Exception:
    sys.exit(1)
conn.autocommit = True
with conn.cursor() as cur:
    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (sys.argv[1],))
    if not cur.fetchone():
        cur.execute(f'CREATE DATABASE "{sys.argv[1]}"')
PY
then
  export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="postgresql+psycopg2://postgres@127.0.0.1:5432/$PG_DB"
  export AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-16}
  echo "== metadata database: PostgreSQL 127.0.0.1:5432/$PG_DB (LocalExecutor, parallelism $AIRFLOW__CORE__PARALLELISM)"
else
  export AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-4}
  echo "== metadata database: SQLite in $AIRFLOW_HOME (no PostgreSQL answered on 127.0.0.1:5432)."
  echo "   Parallelism is held at $AIRFLOW__CORE__PARALLELISM: SQLite locks up under a larger batch."
fi

# --- the API server port ---------------------------------------------------------------------
API_PORT=${IMAGECB_API_PORT:-8080}
port_busy "$API_PORT" && API_PORT=$(free_port)
export AIRFLOW__API__PORT=$API_PORT
export AIRFLOW__API__BASE_URL="http://localhost:$API_PORT"
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="http://localhost:$API_PORT/execution/"

# --- the simulator and the connection --------------------------------------------------------
SIM_PORT=${IMAGECB_SIM_PORT:-8089}
port_busy "$SIM_PORT" && SIM_PORT=$(free_port)
python -m imagecb_provider.testing.simulator --port "$SIM_PORT" --latency "${IMAGECB_SIM_LATENCY:-5}" \
  > "$AIRFLOW_HOME/simulator.log" 2>&1 &
SIM_PID=$!
trap 'kill $SIM_PID 2>/dev/null || true' EXIT

airflow db migrate > "$AIRFLOW_HOME/db-migrate.log" 2>&1
CONN="{\"conn_type\":\"imagecb\",\"host\":\"http://127.0.0.1:$SIM_PORT\",\"password\":\"test-key\"}"
airflow connections delete imagecb_default > /dev/null 2>&1 || true
airflow connections add imagecb_default --conn-json "$CONN" > /dev/null
echo "== simulator on http://127.0.0.1:$SIM_PORT; connection imagecb_default points at it"
echo "== Airflow UI on http://localhost:$API_PORT (user admin; password below once it is generated)"
echo "   trigger the batch:  airflow dags trigger imagecb_batch_generate -c '{\"poll_interval\": 5}'"

( for _ in $(seq 120); do
    f="$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
    if [ -s "$f" ]; then echo "== admin password file: $f"; cat "$f"; echo; break; fi
    sleep 1
  done ) &

exec airflow standalone
