#!/usr/bin/env bash
# make airflow: a full local Airflow with the UI, running this project's DAGs and plugins against
# the API simulator, safe to click through (see docs/ui.md).
#
# With PostgreSQL on 127.0.0.1:5432 (the normal case) it runs the real-stack harness
# (`python -m imagecb_dev.stack up`, dev/README.md): API server, scheduler, DAG
# processor and triggerer as separate processes on a fresh database of their own, dropped at
# Ctrl-C; the images and reports stay in archive/. Without PostgreSQL, or with
# IMAGECB_AIRFLOW_STANDALONE=1 (to keep the runs between sessions), it runs `airflow standalone` on
# SQLite in .airflow/ instead (parallelism 4: SQLite locks up under a larger batch).
#
# Either way: the simulator on port 8089 (IMAGECB_SIM_PORT; IMAGECB_SIM_LATENCY seconds per
# image, default 5), the connection imagecb_default pointing at it, the pool imagecb_submissions
# (1 slot), connection testing enabled, the UI on http://localhost:8080 (IMAGECB_API_PORT; the
# next free port when taken), user admin with the password printed. The batch DAG starts paused
# and has no schedule unless IMAGECB_BATCH_SCHEDULE is set. The contact sheet serves reports and
# images from the project's archive/ only (the batch DAG's default archive_root): set
# AIRFLOW__IMAGECB__ARCHIVE_ROOTS (comma-separated folders, s3:// or gs:// prefixes) for others.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY="$ROOT/${VENV:-.venv}/bin/python"
export PATH="$ROOT/${VENV:-.venv}/bin:$PATH"   # standalone calls `airflow` by name

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_busy() { "$PY" -c 'import socket,sys; s=socket.socket(); sys.exit(0 if s.connect_ex(("127.0.0.1",int(sys.argv[1])))==0 else 1)' "$1"; }
postgres_answers() {
  "$PY" -c 'import socket; socket.create_connection(("127.0.0.1", 5432), timeout=3).close()' 2>/dev/null
}

API_PORT=${IMAGECB_API_PORT:-8080}
if port_busy "$API_PORT"; then API_PORT=$(free_port); fi
SIM_PORT=${IMAGECB_SIM_PORT:-8089}
if port_busy "$SIM_PORT"; then SIM_PORT=$(free_port); fi
LOGS="$ROOT/.airflow"
mkdir -p "$LOGS"
# Where the contact sheet may read reports and images ([imagecb] archive_roots): never elsewhere.
ARCHIVE_ROOTS=${AIRFLOW__IMAGECB__ARCHIVE_ROOTS:-$ROOT/archive}

# --- the simulator and the connection to it --------------------------------------------------
"$PY" -m imagecb_provider.testing.simulator --port "$SIM_PORT" --latency "${IMAGECB_SIM_LATENCY:-5}" \
  > "$LOGS/simulator.log" 2>&1 &
SIM_PID=$!
trap 'kill "$SIM_PID" 2>/dev/null || true' EXIT
trap 'exit 130' INT   # run after Airflow has stopped (bash waits for it), then the EXIT trap
trap 'exit 143' TERM
# The port in its own field, not in the host: the connection list's Test button of Airflow 3.3.2
# sends port 0 for a connection without one, which the API refuses as "differs from the stored
# connection" (400 Bad Request).
CONN="{\"conn_type\": \"imagecb\", \"host\": \"http://127.0.0.1\", \"port\": $SIM_PORT, \"password\": \"test-key\"}"

echo "== simulator on http://127.0.0.1:$SIM_PORT (log: $LOGS/simulator.log); connection imagecb_default points at it"
echo "== UI: http://localhost:$API_PORT  (open it as localhost, the address the links use)"
echo "   the contact sheet serves reports and images under: $ARCHIVE_ROOTS"
echo "   then see docs/ui.md: trigger the batch from the DAG page (it starts paused), open a run's"
echo "   'Contact sheet' tab, rerun a group by clearing its image.generate instance"

if [ -z "${IMAGECB_AIRFLOW_STANDALONE:-}" ] && postgres_answers; then
  # --- the real stack on PostgreSQL ----------------------------------------------------------
  # --schedule: the scheduler creates runs as in any deployment (without it, neither cron nor
  # asset schedules make runs); every DAG starts paused, and the batch has no schedule by default.
  # The stack's processes inherit no AIRFLOW* variable of this shell: the roots go as --env.
  ARGS=(up --port "$API_PORT" --conn "imagecb_default=$CONN" --pool imagecb_submissions=1 --schedule
        --env "AIRFLOW__IMAGECB__ARCHIVE_ROOTS=$ARCHIVE_ROOTS")
  echo "== PostgreSQL answers on 127.0.0.1:5432: starting the real stack (a fresh database, dropped at Ctrl-C)"
  "$PY" -m imagecb_dev.stack "${ARGS[@]}"
  exit $?
fi

# --- no PostgreSQL: airflow standalone on SQLite -------------------------------------------------
echo "== airflow standalone on SQLite in $LOGS (parallelism 4; the runs are kept between sessions)."
echo "   For the real stack, unset IMAGECB_AIRFLOW_STANDALONE and have PostgreSQL answer on 127.0.0.1:5432:"
echo "   pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start"
export AIRFLOW_HOME=${AIRFLOW_HOME:-$LOGS}
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-4}
export AIRFLOW__CORE__TEST_CONNECTION=Enabled
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL=${AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL:-30}
export AIRFLOW__API__PORT=$API_PORT
export AIRFLOW__API__BASE_URL="http://localhost:$API_PORT"
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="http://localhost:$API_PORT/execution/"
export AIRFLOW__IMAGECB__ARCHIVE_ROOTS="$ARCHIVE_ROOTS"

airflow db migrate > "$LOGS/db-migrate.log" 2>&1
airflow connections delete imagecb_default > /dev/null 2>&1 || true
airflow connections add imagecb_default --conn-json "$CONN" > /dev/null
( for _ in $(seq 120); do
    f="$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
    if [ -s "$f" ]; then echo "== user admin; password in $f"; break; fi
    sleep 1
  done ) &
airflow standalone
