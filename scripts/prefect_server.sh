#!/usr/bin/env bash
# A local Prefect API + UI (SQLite under .cache/prefect), for the demo and for a person to look at.
# Usage: scripts/prefect_server.sh start|stop|status     (PREFECT_PORT, default 4200)
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PREFECT_PORT:-4200}
export PREFECT_HOME=${PREFECT_HOME:-$PWD/.cache/prefect}
export PREFECT_SERVER_ANALYTICS_ENABLED=false
# The UI asks the API at these (not at the CLI's --host/--port): keep them equal.
export PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT=$PORT
PIDFILE=$PREFECT_HOME/server.pid
LOG=$PREFECT_HOME/server.log
URL=http://127.0.0.1:$PORT
# where requant's CLI finds this server (requant/prefect_api.py): its commands' runs appear here
RECORD=$PWD/.cache/prefect/api-url
mkdir -p "$PREFECT_HOME" "$(dirname "$RECORD")"

healthy() { curl -sf "$URL/api/health" >/dev/null 2>&1; }

case "${1:-}" in
  start)
    if healthy; then echo "$URL/api" >"$RECORD"; echo "Prefect server already up: $URL"; exit 0; fi
    setsid .venvs/pipeline/bin/prefect server start >"$LOG" 2>&1 &
    echo $! >"$PIDFILE"
    for _ in $(seq 1 120); do
      if healthy; then
        echo "$URL/api" >"$RECORD"; echo "Prefect server up: $URL (UI), log $LOG"; exit 0
      fi
      if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        echo "Prefect server exited during start; last lines of $LOG:" >&2; tail -n 20 "$LOG" >&2; exit 1
      fi
      sleep 1
    done
    echo "Prefect server not healthy after 120 s; see $LOG" >&2; exit 1 ;;
  stop)
    if [ -f "$PIDFILE" ]; then
      pid=$(cat "$PIDFILE")
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      rm -f "$PIDFILE" "$RECORD"; echo "Prefect server stopped"
    else echo "no Prefect server started by this script"; fi ;;
  status) if healthy; then echo "up: $URL"; else echo "down"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
