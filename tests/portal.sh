#!/usr/bin/env bash
# The portal (/portal) in a real browser: Debian's headless chromium driven by
# puppeteer-core (from npm; it downloads no browser). Against a fresh server, this script
# makes three accesses to a patient's record (a practitioner with the patient's Consent, a
# practitioner without one — refused — and that practitioner again with break-the-glass),
# then tests/portal/portal_browser.mjs signs in as the patient and as an auditor, checks every
# row verified in the browser, a tampered proof marked "not verified", and that revoking the
# Consent on the page makes the practitioner's next read refused. Screenshots go to
# $FHIRLEDGER_ARTIFACTS (default: ./ci-artifacts/portal). Fails (never skips) when chromium,
# node or puppeteer-core is missing.
#
# Usage: tests/portal.sh   (FHIRLEDGER_PORTAL_NODE names a directory whose node_modules holds
#        puppeteer-core, as .ci/run installs it; FHIRLEDGER_BIN a binary, else the debug build)
set -euo pipefail

# shellcheck source=tests/lib/server.sh
source "$(dirname "$0")/lib/server.sh"
command -v chromium >/dev/null || { echo "portal: no chromium (apt-get install chromium, as .ci/run does)" >&2; exit 1; }
command -v node >/dev/null || { echo "portal: no node (apt-get install nodejs, as .ci/run does)" >&2; exit 1; }
node_dir=${FHIRLEDGER_PORTAL_NODE:-${XDG_CACHE_HOME:-$HOME/.cache}/fhirledger/portal-node}
[[ -d $node_dir/node_modules/puppeteer-core ]] || {
    echo "portal: no puppeteer-core in $node_dir (npm install --prefix $node_dir puppeteer-core, as .ci/run does)" >&2
    exit 1
}
artifacts=${FHIRLEDGER_ARTIFACTS:-$repo/ci-artifacts}/portal
mkdir -p "$artifacts"

echo "== the portal's proof checks against RFC 6962 vectors (node)"
node "$repo/tests/portal/verify_vectors.mjs"

tmp=$(mktemp -d)
idp_pid=
trap 'stop_fhirledger; [[ -n $idp_pid ]] && kill "$idp_pid" 2>/dev/null; rm -rf "$tmp"' EXIT
start_fhirledger "$tmp"
fhir=http://127.0.0.1:$port/fhir
token() { (cd "$tmp" && FHIRLEDGER_LISTEN=127.0.0.1:$port "$binary" token "$@"); }

admin=$(token --sub ehr-sync --scope 'system/*.cruds')
create() {
    curl -sS --fail-with-body -H "Authorization: Bearer $admin" -H 'Content-Type: application/fhir+json' \
        "$fhir/$1" -d "$2" | jq -r .id
}
patient=$(create Patient '{"resourceType":"Patient","name":[{"family":"Chalmers","given":["Peter"]}]}')
dr_a=$(create Practitioner '{"resourceType":"Practitioner","name":[{"prefix":["Dr"],"given":["Anna"],"family":"Adams"}]}')
dr_b=$(create Practitioner '{"resourceType":"Practitioner","name":[{"prefix":["Dr"],"given":["Ben"],"family":"Baker"}]}')

patient_token=$(token --sub peter --scope 'patient/*.cruds' --patient "$patient")
dr_a_token=$(token --sub dr-adams --scope 'user/*.rs' --fhir-user "Practitioner/$dr_a")
dr_b_token=$(token --sub dr-baker --scope 'user/*.rs' --fhir-user "Practitioner/$dr_b")
dr_b_glass=$(token --sub dr-baker --scope 'user/*.rs' --fhir-user "Practitioner/$dr_b" --purpose-of-use ETREAT)
auditor_token=$(token --sub auditor-1 --scope 'ledger.read')

# The patient's Consent for Dr Adams, made through the API as the patient's app would.
curl -sS --fail-with-body -o /dev/null -H "Authorization: Bearer $patient_token" \
    -H 'Content-Type: application/fhir+json' "$fhir/Consent" -d '{
  "resourceType":"Consent","status":"active",
  "scope":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/consentscope","code":"patient-privacy"}]},
  "category":[{"coding":[{"system":"http://loinc.org","code":"59284-0"}]}],
  "patient":{"reference":"Patient/'"$patient"'"},
  "policyRule":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"OPTIN"}]},
  "provision":{"type":"permit","actor":[{"role":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ParticipationType","code":"PRCP"}]},
    "reference":{"reference":"Practitioner/'"$dr_a"'"}}]}}'

status_of() { curl -sS -o /dev/null -D "$tmp/headers" -w '%{http_code}' -H "Authorization: Bearer $1" "$fhir/Patient/$patient"; }
[[ $(status_of "$dr_a_token") == 200 ]] || { echo "portal: Dr Adams, with Consent, was not let in" >&2; exit 1; }
receipt=$(tr -d '\r' <"$tmp/headers" | awk -F': ' 'tolower($1)=="x-ledger-entry"{print $2}')
[[ $(status_of "$dr_b_token") == 403 ]] || { echo "portal: Dr Baker, without Consent, was let in" >&2; exit 1; }
[[ $(status_of "$dr_b_glass") == 200 ]] || { echo "portal: Dr Baker's break-the-glass read was refused" >&2; exit 1; }
echo "ok: three accesses made (permitted with Consent, refused, break-the-glass); receipt $receipt"

PORTAL_URL="http://127.0.0.1:$port" PORTAL_PATIENT="$patient" PORTAL_DR_A="Practitioner/$dr_a" \
    PORTAL_DR_B="Practitioner/$dr_b" PORTAL_PATIENT_TOKEN="$patient_token" PORTAL_DR_A_TOKEN="$dr_a_token" \
    PORTAL_AUDITOR_TOKEN="$auditor_token" PORTAL_RECEIPT="$receipt" PORTAL_ARTIFACTS="$artifacts" \
    PORTAL_NODE="$node_dir" node "$repo/tests/portal/portal_browser.mjs"

echo "== a SMART standalone launch with PKCE, against a stand-in identity provider"
jwks=$tmp/jwks.json
curl -sS --fail-with-body "http://127.0.0.1:$port/.well-known/jwks.json" >"$jwks"
stop_fhirledger
idp_port=
for _ in $(seq 20); do
    candidate=$((20000 + RANDOM % 20000))
    (exec 3<>"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null && continue
    MOCK_IDP_TOKEN_FILE=$tmp/smart-token python3 "$repo/tests/portal/mock_idp.py" "$candidate" fhirledger-portal &
    idp_pid=$!
    for _ in $(seq 50); do
        curl -s -o /dev/null "http://127.0.0.1:$candidate/" && { idp_port=$candidate; break 2; }
        sleep 0.1
    done
    kill "$idp_pid" 2>/dev/null || true
done
[[ -n $idp_port ]] || { echo "portal: could not start the stand-in identity provider" >&2; exit 1; }
idp=http://127.0.0.1:$idp_port
mkdir "$tmp/smart"
FHIRLEDGER_TRUSTED_ISSUERS="$idp=$jwks" FHIRLEDGER_SMART_TOKEN_ENDPOINT=$idp/token \
    FHIRLEDGER_SMART_AUTHORIZATION_ENDPOINT=$idp/authorize FHIRLEDGER_PORTAL_CLIENT_ID=fhirledger-portal \
    start_fhirledger "$tmp/smart"
fhir=http://127.0.0.1:$port/fhir
token() { (cd "$tmp/smart" && FHIRLEDGER_LISTEN=127.0.0.1:$port "$binary" token "$@"); }
admin=$(token --sub ehr-sync --scope 'system/*.cruds')
patient=$(create Patient '{"resourceType":"Patient","name":[{"family":"Launch"}]}')
# What the provider issues on a good exchange: a token for the patient it chose.
printf '%s\n%s\n' "$(token --sub peter --scope 'patient/*.rs patient/Consent.cu' --patient "$patient")" "$patient" \
    >"$tmp/smart-token"
PORTAL_PHASE=smart PORTAL_URL="http://127.0.0.1:$port" PORTAL_IDP="$idp" PORTAL_PATIENT="$patient" \
    PORTAL_ARTIFACTS="$artifacts" PORTAL_NODE="$node_dir" node "$repo/tests/portal/portal_browser.mjs"
