#!/usr/bin/env bash
# Apply the whole Prefect side of requant to the server at $PREFECT_API_URL, idempotently:
#   work pools requant-gpu (one flow run at a time) and requant-serving,
#   the global concurrency limit requant-gpu (1 slot: runs from any pool share one GPU),
#   the deployments of prefect.yaml and the automation declared there (promote's trigger).
# REQUANT_POOL_KIND=process (default, this machine) | docker | kubernetes picks the worker type;
# docker/kubernetes pools take their base job templates from deployments/work-pools/.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT=${PREFECT:-.venvs/pipeline/bin/prefect}
KIND=${REQUANT_POOL_KIND:-process}
case "$KIND" in process|docker|kubernetes) ;; *)
  echo "REQUANT_POOL_KIND=$KIND: use process, docker or kubernetes" >&2; exit 2 ;; esac
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server (e.g. http://127.0.0.1:4200/api)}"

for pool in gpu serving; do
  args=(--type "$KIND" --overwrite)
  if [ "$KIND" != process ]; then args+=(--base-job-template "deployments/work-pools/$KIND-$pool.json"); fi
  "$PREFECT" --no-prompt work-pool create "requant-$pool" "${args[@]}"
done
"$PREFECT" --no-prompt work-pool set-concurrency-limit requant-gpu 1
if "$PREFECT" --no-prompt global-concurrency-limit inspect requant-gpu >/dev/null 2>&1; then
  "$PREFECT" --no-prompt global-concurrency-limit update requant-gpu --limit 1
else
  "$PREFECT" --no-prompt global-concurrency-limit create requant-gpu --limit 1
fi
"$PREFECT" --no-prompt deploy --all
echo "applied: pools requant-gpu, requant-serving ($KIND); limit requant-gpu=1; deployments + automation from prefect.yaml"
