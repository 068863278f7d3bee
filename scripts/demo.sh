#!/usr/bin/env bash
# make demo: start the simulator, run the main DAG end to end with `airflow dags test`, print what
# it made, then run the branching example (one route per prompt) and print the route each prompt
# took; stop the simulator. Exits non-zero when a run fails.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-.venv}
export PATH="$ROOT/$VENV/bin:$PATH"
DEMO=${IMAGECB_DEMO_DIR:-$ROOT/.demo}
DAG_ID=imagecb_batch_generate
RUN_DATE=${IMAGECB_DEMO_DATE:-$(date -u +%Y-%m-%d)}
mkdir -p "$DEMO"

export AIRFLOW_HOME="$DEMO/airflow"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__LOGGING__LOGGING_LEVEL=${AIRFLOW__LOGGING__LOGGING_LEVEL:-WARNING}

# The simulator on 8089, or on a free port when 8089 is taken.
PORT=${IMAGECB_SIM_PORT:-8089}
if ! python - "$PORT" <<'PY'
import socket, sys
with socket.socket() as s:
    sys.exit(s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0)
PY
then
  PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
fi
python -m imagecb_provider.testing.simulator --port "$PORT" --latency 2 > "$DEMO/simulator.log" 2>&1 &
SIM_PID=$!
trap 'kill $SIM_PID 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  curl -sf "http://127.0.0.1:$PORT/_sim/health" >/dev/null && break
  sleep 0.2
done
export AIRFLOW_CONN_IMAGECB_DEFAULT="{\"conn_type\":\"imagecb\",\"host\":\"http://127.0.0.1:$PORT\",\"password\":\"test-key\"}"

echo "== simulator on http://127.0.0.1:$PORT; Airflow home $AIRFLOW_HOME"
airflow db migrate > "$DEMO/db-migrate.log" 2>&1
ARCHIVE="$DEMO/archive"
RUN_LOG="$DEMO/$DAG_ID.log"
# The demo's prompts fail on purpose (see include/prompts/demo.csv): the run reports them without failing.
CONF="{\"archive_root\": \"$ARCHIVE\", \"poll_interval\": 1, \"timeout\": 8, \"chunk_size\": 4, \"fail_run_on_lost\": false}"
echo "== airflow dags test $DAG_ID $RUN_DATE (log: $RUN_LOG)"
started=$(date +%s)
status=0
airflow dags test "$DAG_ID" "$RUN_DATE" -c "$CONF" > "$RUN_LOG" 2>&1 || status=$?
if [ "$status" -ne 0 ]; then  # `airflow dags test` exits non-zero when the run failed
  tail -40 "$RUN_LOG"
  echo "== the run FAILED (exit $status); full log: $RUN_LOG" >&2
  exit 1
fi
RUN_FOLDER=$(ls -td "$ARCHIVE/$RUN_DATE"/runs/*/ | head -1); RUN_FOLDER=${RUN_FOLDER%/}
echo "== done in $(( $(date +%s) - started )) s"
python - "$RUN_FOLDER/summary.json" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
print("outcomes:", json.dumps(summary["counts"]))
print(f"rejected rows: {summary['rejected']}, resubmitted: {summary['resubmitted']}, "
      f"reused from an earlier run: {summary['reused_from_earlier_run']}, credits used: {summary['credits']['used']}")
for image in summary["images"]:
    kept = next((f["path"] for f in image["files"] if f["source"] == "result"), "-")
    print(f"  line {image['line']:>2} {image['outcome']:<17} {kept}")
print(f"prompts without an image: {summary['lost']} (quarantined with their reason)")
PY
echo "== summary: $RUN_FOLDER/summary.json"
echo "== report:  $RUN_FOLDER/report.html"

# The branching example: each prompt of its default list takes the route its own outcome chose.
BRANCH_DAG_ID=imagecb_branching
BRANCH_LOG="$DEMO/$BRANCH_DAG_ID.log"
BRANCH_CONF="{\"archive_root\": \"$DEMO/branching\", \"poll_interval\": 0.5, \"timeout\": 8}"
echo "== airflow dags test $BRANCH_DAG_ID $RUN_DATE (log: $BRANCH_LOG)"
started=$(date +%s)
status=0
airflow dags test "$BRANCH_DAG_ID" "$RUN_DATE" -c "$BRANCH_CONF" > "$BRANCH_LOG" 2>&1 || status=$?
if [ "$status" -ne 0 ]; then
  tail -40 "$BRANCH_LOG"
  echo "== the run FAILED (exit $status); full log: $BRANCH_LOG" >&2
  exit 1
fi
echo "== done in $(( $(date +%s) - started )) s"
# One line per prompt (map index): the outcome of its first generation, and the tasks of its route
# that ran, read from the run's task instances and XComs in the metadata database.
python - "$BRANCH_DAG_ID" "$RUN_DATE" <<'PY'
import sys
import warnings
from datetime import UTC, datetime

warnings.simplefilter("ignore")
from airflow.models.dagrun import DagRun
from airflow.models.taskinstance import TaskInstance
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session
from sqlalchemy import select

GROUP = "image."
ROUTE = ("rewrite", "regenerate", "resubmit", "quarantine", "archive")  # in the order they run
with create_session() as session:
    logical_date = datetime.fromisoformat(sys.argv[2]).replace(tzinfo=UTC)
    run = session.scalars(select(DagRun).where(DagRun.dag_id == sys.argv[1], DagRun.logical_date == logical_date)).one()
    tis = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == run.dag_id, TaskInstance.run_id == run.run_id)).all()
    xcoms = session.scalars(select(XComModel).where(
        XComModel.dag_id == run.dag_id, XComModel.run_id == run.run_id, XComModel.key == "return_value"
    )).all()
    values = {(x.task_id, x.map_index): XComModel.deserialize_value(x) for x in xcoms}
    ran = {(ti.task_id, ti.map_index) for ti in tis if ti.state == "success"}
    indexes = sorted({ti.map_index for ti in tis if ti.task_id == GROUP + "generate"})
print(f"run {run.run_id}: {run.state}")
for index in indexes:
    result = values.get((GROUP + "generate", index)) or {}
    route = [name for name in ROUTE if (GROUP + name, index) in ran] or ["(none)"]
    rewritten = values.get((GROUP + "rewrite", index))
    extra = f"  rewritten as {rewritten!r}" if rewritten else ""
    print(f"  {index}  {str(result.get('outcome')):<18} {' > '.join(route):<31} {result.get('prompt', '')!r}{extra}")
PY
echo "== images:     $DEMO/branching/images (manifest.jsonl)"
echo "== quarantine: $DEMO/branching/quarantine.jsonl"
