#!/usr/bin/env bash
# "Using it by hand" from the README, as a script that runs: certificates,
# a server, both partners' uploads, overlap, queries, templates, an erasure
# with a file it makes, an agreement matched without a shared secret
# (policies/retail-media-ecdh.toml), the admin view, the audit log and,
# when a Python with the ADBC Flight SQL driver is given
# (CLEANROOM_PYTHON), a Flight SQL query. Each command is printed before
# it runs. CI runs it (.ci/run).
#
#   examples/by_hand.sh            # builds the binary if needed
#   CLEANROOM_BIN=path/to/cleanroom examples/by_hand.sh
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -z "${CLEANROOM_BIN:-}" ]]; then
  (cd "$REPO" && cargo build --quiet --bin cleanroom)
  CLEANROOM_BIN="${CARGO_TARGET_DIR:-$REPO/target}/debug/cleanroom"
fi
B="$CLEANROOM_BIN"
W="$(mktemp -d)"
SERVER_PID=
finish() {
  if [[ -n "$SERVER_PID" ]]; then kill "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$W"
}
trap finish EXIT
cd "$W"
cp -r "$REPO/policies" policies

run() {
  printf '\n$ cleanroom %s\n' "$*"
  "$B" "$@"
}

# Certificates, then the server on a free port of 127.0.0.1.
run policy check                          # validate ./policies
run certs init                            # CA + server cert in ./cleanroom-data/certs
run certs issue --org acme                # acme.pem, acme-key.pem
run certs issue --org globex
printf '\n$ cleanroom serve --listen 127.0.0.1:0 &\n'
"$B" serve --listen 127.0.0.1:0 --log-format json 2> server.log &
SERVER_PID=$!
for _ in $(seq 1 300); do
  grep -q '"listening"' server.log 2>/dev/null && break
  sleep 0.1
done
ADDR="$(sed -n 's/.*"message":"listening".*"addr":"\([^"]*\)".*/\1/p; s/.*"addr":"\([^"]*\)".*"message":"listening".*/\1/p' server.log | head -1)"
[[ -n "$ADDR" ]] || { cat server.log; echo "the server did not start"; exit 1; }
export CLEANROOM_SERVER="https://$ADDR"
as() {
  export CLEANROOM_CERT="cleanroom-data/certs/$1.pem" CLEANROOM_KEY="cleanroom-data/certs/$1-key.pem"
}

as acme
run whoami                                # acme (party to 2 agreement(s))
run agreements                            # agreements acme is a party to
run agreements show retail-media-demo     # the agreement as acme may see it

run synth --rows 20000 --out synth        # synthetic acme and globex files
run secret new --out shared.secret        # the partners' shared secret (never sent to the server)
run upload --agreement retail-media-demo --dataset customers --input synth/acme-customers.csv --secret-file shared.secret --no-progress
as globex
run upload --agreement retail-media-demo --dataset audience --input synth/globex-audience.csv --secret-file shared.secret --no-progress
as acme
run datasets --agreement retail-media-demo # what the server holds of your data
run overlap --agreement retail-media-demo  # people in both datasets
run query --agreement retail-media-demo --sql "SELECT c.region, COUNT(*) AS customers, AVG(c.lifetime_value) AS ltv FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region ORDER BY c.region"
echo "SELECT a.interest_segment, COUNT(*) AS customers FROM customers c JOIN audience a ON c.email = a.email GROUP BY a.interest_segment" > segments.sql
run query --agreement retail-media-demo --epsilon 0.5 --sql-file segments.sql --format json
run templates --agreement retail-media-demo # approved templates and their parameters
run run --agreement retail-media-demo lift_by_region --param min_exposures=1
run budget --agreement retail-media-demo   # privacy budget: spent, remaining, next refresh
if run query --agreement retail-media-demo --sql "SELECT c.email FROM customers c"; then
  echo "a row-level query was answered"; exit 1
else
  echo "(refused, exit $?: as it should be)"
fi

# Erasure: the first 25 customers withdraw; their rows are fingerprinted here.
head -n 26 synth/acme-customers.csv > withdrawn.csv
run erase --agreement retail-media-demo --dataset customers --input withdrawn.csv --secret-file shared.secret
run datasets --agreement retail-media-demo

# Matching without a shared secret: each party's own key.
run key new --out acme.key                # this party's own key; never sent anywhere
run upload --agreement retail-media-ecdh --dataset customers --input synth/acme-customers.csv --key-file acme.key --no-progress
as globex
run key new --out globex.key
run upload --agreement retail-media-ecdh --dataset audience --input synth/globex-audience.csv --key-file globex.key --no-progress
run match --agreement retail-media-ecdh --key-file globex.key  # blind acme's relayed points
as acme
run match --agreement retail-media-ecdh --key-file acme.key    # blind globex's; say what is left
run overlap --agreement retail-media-ecdh
run query --agreement retail-media-ecdh --sql "SELECT c.age_band, COUNT(*) AS customers FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.age_band ORDER BY c.age_band"

run report --agreement retail-media-demo  # what the service holds of your data, who used it
run admin status                          # agreements acme administers (retail-media-ecdh)
run audit show --agreement retail-media-demo | tail -n 6

# Flight SQL from Python, with the same certificates.
if [[ -n "${CLEANROOM_PYTHON:-}" ]] && "$CLEANROOM_PYTHON" -c 'import adbc_driver_flightsql' 2>/dev/null; then
  printf '\n$ python  # Flight SQL through ADBC\n'
  "$CLEANROOM_PYTHON" - "$ADDR" <<'PY'
import sys
import adbc_driver_flightsql.dbapi as fs
certs = "cleanroom-data/certs/"
conn = fs.connect(f"grpc+tls://{sys.argv[1]}", db_kwargs={
    "adbc.flight.sql.client_option.tls_root_certs": open(certs + "ca.pem").read(),
    "adbc.flight.sql.client_option.mtls_cert_chain": open(certs + "acme.pem").read(),
    "adbc.flight.sql.client_option.mtls_private_key": open(certs + "acme-key.pem").read(),
    "adbc.flight.sql.rpc.call_header.x-cleanroom-agreement": "retail-media-demo",
})
cur = conn.cursor()
cur.execute("SELECT c.region, COUNT(*) AS n FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region ORDER BY c.region")
print(cur.fetch_arrow_table().to_pandas() if hasattr(cur, "fetch_arrow_table") else cur.fetchall())
PY
else
  printf '\n(Flight SQL skipped: set CLEANROOM_PYTHON to a Python with adbc-driver-flightsql)\n'
fi

# Stop the server; check the audit log's hash chain on its files.
printf '\n$ kill -TERM %s\n' "$SERVER_PID"
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || true
SERVER_PID=
run audit verify --data-dir cleanroom-data # on the server's machine: check the hash chain
echo
echo "by_hand.sh: every step ran"
