#!/usr/bin/env bash
# Apply the whole Prefect side of requant to the server at $PREFECT_API_URL, idempotently:
#   work pools requant-gpu and requant-serving,
#   the global concurrency limit requant-gpu with REQUANT_GPUS slots (default 1): it counts GPUs;
#   a run holds quantization.gpus of them while it quantizes and evaluates (requant/gpu_limit.py),
#   the deployments of prefect.yaml and the automation declared there (promote's trigger),
#   and requant's own automations (`requant automations`: silent runs marked Crashed; with
#   REQUANT_NOTIFY_WEBHOOK_URL set, failed runs and gates sent to the team's webhook).
# REQUANT_POOL_KIND=process (default, this machine) | docker | kubernetes picks the worker type;
# docker/kubernetes pools take their base job templates from deployments/work-pools/.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT=${PREFECT:-.venvs/pipeline/bin/prefect}
KIND=${REQUANT_POOL_KIND:-process}
GPUS=${REQUANT_GPUS:-1}
case "$GPUS" in ''|*[!0-9]*|0) echo "REQUANT_GPUS=$GPUS: use the number of GPUs (>= 1)" >&2; exit 2 ;; esac
# Process and Docker workers cannot give two runs different GPUs of one host: one flow run at a
# time there. On Kubernetes the device plugin assigns GPUs, so the pool may run as many as fit.
POOL_RUNS=1
if [ "$KIND" = kubernetes ]; then POOL_RUNS=$GPUS; fi
case "$KIND" in process|docker|kubernetes) ;; *)
  echo "REQUANT_POOL_KIND=$KIND: use process, docker or kubernetes" >&2; exit 2 ;; esac
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server (e.g. http://127.0.0.1:4200/api)}"

# Every pool from a locked base job template (requant/job_template.py): a custom run may name
# and label its job, nothing else; command, env, working dir, image, volumes are the operator's.
PY=$(dirname "$PREFECT")/python
locked=$(mktemp -d)
trap 'rm -rf "$locked"' EXIT
for pool in gpu serving; do
  if [ "$KIND" = process ]; then
    "$PREFECT" --no-prompt work-pool get-default-base-job-template --type process >"$locked/open.json"
  else
    cp "deployments/work-pools/$KIND-$pool.json" "$locked/open.json"
  fi
  "$PY" -m requant.job_template "$locked/open.json" >"$locked/$pool.json"
  "$PREFECT" --no-prompt work-pool create "requant-$pool" --type "$KIND" --overwrite \
    --base-job-template "$locked/$pool.json"
done
"$PREFECT" --no-prompt work-pool set-concurrency-limit requant-gpu "$POOL_RUNS"
if "$PREFECT" --no-prompt global-concurrency-limit inspect requant-gpu >/dev/null 2>&1; then
  "$PREFECT" --no-prompt global-concurrency-limit update requant-gpu --limit "$GPUS"
else
  "$PREFECT" --no-prompt global-concurrency-limit create requant-gpu --limit "$GPUS"
fi
for target in local kubernetes; do  # one rollout per target, inline promotes included
  if ! "$PREFECT" --no-prompt global-concurrency-limit inspect "requant-rollout-$target" >/dev/null 2>&1; then
    "$PREFECT" --no-prompt global-concurrency-limit create "requant-rollout-$target" --limit 1
  fi
done
"$PREFECT" --no-prompt deploy --all
# silent runs marked Crashed; failed runs and gates to the team's webhook when
# REQUANT_NOTIFY_WEBHOOK_URL is set here (requant/alerts.py)
"$(dirname "$PREFECT")/requant" automations
echo "applied: pools requant-gpu ($POOL_RUNS run(s) at once), requant-serving ($KIND); limit requant-gpu=$GPUS GPU(s); deployments + automations"
