# The workshop's settings and two helpers. Source it in every terminal of the
# workshop, before `make run` and every other command:   source docs/workshop/env.sh
# tests/test_workshop.py starts its server with these same settings.

export FLASK_REALTIME_PUBLISH_KEY=dev-key  # turns on POST /api/realtime/publish (off when unset)
export FLASK_REALTIME_HEARTBEAT_S=2        # a keep-alive comment after 2 s of silence, not 15
export FLASK_DEMO_ENABLED=true             # the demo's report job in `flask jobs worker` too (`make run` has it anyway)
export FLASK_JOBS_EMBEDDED=false           # jobs run in `flask jobs worker`, which exercise 12 kills
export FLASK_JOBS_LEASE_S=3                # a killed worker's run is resumed after 3 s, not 30
export WORKSHOP_URL=http://localhost:5000  # the server docs/workshop/*.py talk to

# token CHANNEL TOPIC...   print a subscription token for CHANNEL and its TOPICs (exercise 1).
token() {
  local channel=$1 topics
  shift
  topics=$(printf '"%s", ' "$@")
  curl -s localhost:5000/api/realtime/token -H 'Content-Type: application/json' \
    -d "{\"channel\": \"$channel\", \"topics\": [${topics%, }]}" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])'
}

# publish CHANNEL TOPIC JSON   publish one message; print the stored envelope (exercise 1).
publish() {
  curl -s localhost:5000/api/realtime/publish -H "Authorization: Bearer $FLASK_REALTIME_PUBLISH_KEY" \
    -H 'Content-Type: application/json' -d "{\"channel\": \"$1\", \"topic\": \"$2\", \"data\": $3}"
  echo
}
