"""Drives a running fhirledger with fhirpy (from PyPI), as an app built on it would.

Every interaction a client library makes is tried once and checked on what the server
answered; the script prints one line per interaction and exits non-zero when any failed.
Environment: FHIR_BASE (e.g. http://127.0.0.1:8080/fhir) and FHIR_TOKEN (a system/*.cruds
bearer token).
"""

import os
import sys
import traceback

from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import ResourceNotFound

BASE = os.environ["FHIR_BASE"]
client = SyncFHIRClient(BASE, authorization=f"Bearer {os.environ['FHIR_TOKEN']}")
failures = []


def step(name):
    """Runs the decorated check at once, recording its outcome under `name`."""

    def run(check):
        try:
            detail = check()
            print(f"ok    {name}" + (f": {detail}" if detail else ""))
        except Exception as error:  # a failed check of any kind is reported, not raised
            failures.append(name)
            print(f"FAIL  {name}: {error!r}")
            traceback.print_exc(limit=2)
        return check

    return run


state = {}


@step("capability statement (GET metadata)")
def _():
    statement = client.execute("metadata", method="get")
    assert statement["resourceType"] == "CapabilityStatement", statement
    return f"fhirVersion {statement['fhirVersion']}"


@step("create (resource.save)")
def _():
    patient = client.resource("Patient", name=[{"family": "Fhirpy", "given": ["Ada"]}], gender="female")
    patient.save()
    assert patient.id and patient["meta"]["versionId"] == "1", patient
    state["patient"] = patient
    return f"Patient/{patient.id}"


@step("read (reference.to_resource)")
def _():
    read = client.reference("Patient", state["patient"].id).to_resource()
    assert read["name"][0]["family"] == "Fhirpy", read


@step("update (save of a changed resource: PUT)")
def _():
    patient = state["patient"]
    patient["birthDate"] = "1990-01-01"
    patient.save()
    assert patient["meta"]["versionId"] == "2", patient


@step("vread (GET _history/1)")
def _():
    first = client.execute(f"Patient/{state['patient'].id}/_history/1", method="get")
    assert first["meta"]["versionId"] == "1" and "birthDate" not in first, first


@step("patch (client.patch: merge patch as application/json)")
def _():
    patched = client.patch("Patient", state["patient"].id, active=True)
    assert patched["active"] is True and patched["meta"]["versionId"] == "3", patched


@step("create 5 Observations")
def _():
    for value in range(5):
        client.resource(
            "Observation",
            status="final",
            code={"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
            subject={"reference": f"Patient/{state['patient'].id}"},
            valueQuantity={"value": 60 + value, "unit": "kg"},
        ).save()


@step("search with paging (limit(2).fetch_all follows next links)")
def _():
    found = client.resources("Observation").search(subject=f"Patient/{state['patient'].id}").limit(2).fetch_all()
    assert len(found) == 5, len(found)
    return f"{len(found)} over 3 pages"


@step("count (_count=0)")
def _():
    count = client.resources("Observation").search(subject=f"Patient/{state['patient'].id}").count()
    assert count == 5, count


@step("chained search (subject:Patient.family)")
def _():
    found = client.resources("Observation").search(**{"subject:Patient.family": "Fhirpy"}).fetch_all()
    assert len(found) == 5, len(found)


@step("compartment search (Patient/{id}/Observation)")
def _():
    bundle = client.execute(f"Patient/{state['patient'].id}/Observation", method="get", params={"_count": 10})
    assert bundle["total"] == 5, bundle


@step("transaction (POST to the base URL with a trailing slash)")
def _():
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:0c5ea1b4-7b2c-4f43-9a3e-3d5d6f9e2a11",
                "resource": {"resourceType": "Patient", "name": [{"family": "Transacted"}]},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "weight"},
                    "subject": {"reference": "urn:uuid:0c5ea1b4-7b2c-4f43-9a3e-3d5d6f9e2a11"},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    reply = client.execute("/", method="post", data=bundle)
    assert reply["type"] == "transaction-response", reply
    statuses = [entry["response"]["status"] for entry in reply["entry"]]
    assert all(status.startswith("201") for status in statuses), statuses


@step("batch")
def _():
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": f"Patient/{state['patient'].id}"}},
            {"request": {"method": "GET", "url": "Patient/no-such-patient"}},
        ],
    }
    reply = client.execute("/", method="post", data=bundle)
    statuses = [entry["response"]["status"][:3] for entry in reply["entry"]]
    assert reply["type"] == "batch-response" and statuses == ["200", "404"], statuses


@step("history: instance, type and system")
def _():
    instance = client.execute(f"Patient/{state['patient'].id}/_history", method="get")
    assert instance["total"] == 3, instance.get("total")
    for path in ("Patient/_history", "_history"):
        bundle = client.execute(path, method="get")
        assert bundle["type"] == "history" and bundle["entry"], path


@step("$everything by GET and by POST")
def _():
    path = f"Patient/{state['patient'].id}/$everything"
    by_get = client.execute(path, method="get")
    by_post = client.execute(path, method="post")
    ids = lambda bundle: sorted(entry["resource"]["id"] for entry in bundle["entry"])  # noqa: E731
    assert len(by_get["entry"]) == 6 and ids(by_get) == ids(by_post), (ids(by_get), ids(by_post))


@step("delete (resource.delete), then a read is 410")
def _():
    patient_id = state["patient"].id
    state["patient"].delete()
    try:
        client.reference("Patient", patient_id).to_resource()
    except ResourceNotFound:
        return None
    raise AssertionError("the deleted patient was still read")


if failures:
    print(f"fhirpy: {len(failures)} interaction(s) failed: {', '.join(failures)}", file=sys.stderr)
    sys.exit(1)
print("fhirpy: every interaction worked")
