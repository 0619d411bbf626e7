// The portal page's behaviour: sign-in (a pasted token, or SMART standalone launch with
// PKCE), the patient's access history checked row by row with verify.js, Consents with grant
// and revoke, and the auditor's view of the log. The token lives in this module's memory
// only; the browser keeps nothing but public data (the pinned ledger key, the last checkpoint).
import * as verify from "/portal/verify.js";

const $ = (id) => document.getElementById(id);
const PAGE = 20;
const PINNED_KEY = "fhirledger.portal.pinned-key";
const LAST_CHECKPOINT = "fhirledger.portal.last-checkpoint";
const SMART_PENDING = "fhirledger.portal.smart-pending";

const session = { token: null, claims: {}, patient: null, auditor: false, readsResources: false, key: null, next: null };
const noteChecks = new Map();

// ---- small helpers -------------------------------------------------------------------

function say(text, error = false) {
  const status = $("status");
  status.textContent = text;
  status.className = error ? "error" : "";
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function facts(pairs) {
  return element(
    "dl",
    {},
    pairs.filter(([, value]) => value).flatMap(([term, value]) => [element("dt", {}, term), element("dd", {}, value)]),
  );
}

function base64UrlDecode(text) {
  const padded = text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4);
  return new TextDecoder().decode(verify.fromBase64(padded));
}

function base64Url(bytes) {
  return verify.toBase64(bytes).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** The server's FHIR API, with the session's token; an OperationOutcome's text on failure. */
async function api(path, options = {}) {
  const headers = { Accept: "application/fhir+json", ...(options.headers || {}) };
  if (session.token) headers.Authorization = `Bearer ${session.token}`;
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    const issue = body && body.issue && body.issue[0];
    const detail = issue ? issue.diagnostics || (issue.details && issue.details.text) || issue.code : String(body);
    throw new Error(`${response.status}: ${detail}`);
  }
  return { body, response };
}

/** A same-origin path for a link the server wrote with its base URL. */
function localPath(url) {
  const parsed = new URL(url, location.origin);
  return parsed.pathname + parsed.search;
}

// ---- the pinned key --------------------------------------------------------------------

/** The ledger key: the one pinned in this browser, or the server's, pinned on first use. */
async function pinnedKey() {
  let vkey = localStorage.getItem(PINNED_KEY);
  let firstUse = false;
  if (!vkey) {
    const { body } = await api("/ledger/key");
    vkey = body.vkey;
    firstUse = true;
  }
  const key = verify.parseVerifierKey(vkey);
  if (firstUse) localStorage.setItem(PINNED_KEY, vkey);
  return { key, firstUse };
}

function describeKey(element, pinned) {
  element.textContent = pinned.firstUse
    ? `Ledger key ${pinned.key.id} pinned in this browser now (first use); later visits check against it.`
    : `Checked against the ledger key ${pinned.key.id} this browser pinned earlier.`;
}

// ---- one entry, verified ---------------------------------------------------------------

/** The ledger-entry extension's parts, by name (repeated parts as arrays). */
function ledgerParts(event) {
  const extension = (event.extension || []).find((e) => e.url.endsWith("/ledger-entry"));
  const parts = {};
  for (const part of (extension && extension.extension) || []) {
    const value = part.valueString ?? part.valueBase64Binary;
    if (part.url === "inclusionProof" || part.url === "cosignedInclusionProof") {
      (parts[part.url] ||= []).push(value);
    } else {
      parts[part.url] = value;
    }
  }
  return parts;
}

/** Verifies an entry as served; returns the mark's outcome and the entry read from its own bytes. */
async function checkEntry({ leafData, leafHash, index, treeSize, proof, checkpoint }) {
  let entry = null;
  let leaf;
  if (leafData) {
    const bytes = verify.fromBase64(leafData);
    leaf = await verify.leafHash(bytes);
    try {
      entry = JSON.parse(new TextDecoder().decode(bytes));
    } catch {
      return { verified: false, why: "the entry's bytes are not an entry" };
    }
  } else if (leafHash) {
    leaf = verify.fromBase64(leafHash);
  } else {
    return { verified: false, why: "the entry came without its bytes or hash" };
  }
  const result = await verify.verifyEntry({
    leaf,
    index: Number(index),
    treeSize: Number(treeSize),
    proof: (proof || []).map(verify.fromBase64),
    note: checkpoint || "",
    key: session.key,
  });
  return { ...result, entry };
}

function mark(result) {
  return result.verified
    ? element("span", { class: "mark verified" }, "\u2714 Verified")
    : element("span", { class: "mark unverified" }, `\u2718 Not verified: ${result.why}`);
}

const ACTIONS = {
  read: "read",
  vread: "read a version of",
  search: "searched",
  history: "read the history of",
  create: "created",
  update: "changed",
  delete: "deleted",
  everything: "read everything in",
  export: "exported",
  "audit-view": "viewed the access history",
  notify: "was notified about",
};

function who(actor) {
  return actor.fhirUser || actor.subject;
}

const names = new Map();

/**
 * The name of the person or organization a reference names (a Practitioner's "Adams,
 * Anna"), read once per page; the reference itself when it cannot be read.
 */
function displayName(reference) {
  // An auditor's token reads the ledger, not resources: asking would only add refusals to it.
  const readable = /^(Practitioner|PractitionerRole|Organization|RelatedPerson|Patient|Device)\/[A-Za-z0-9.-]{1,64}$/;
  if (!session.readsResources || !readable.test(reference || "")) {
    return Promise.resolve(reference);
  }
  if (!names.has(reference)) {
    names.set(
      reference,
      api(`/fhir/${reference}`)
        .then(({ body }) => {
          const name = Array.isArray(body.name) ? body.name[0] : body.name;
          if (typeof name === "string") return name;
          if (!name) return reference;
          return name.text || [name.prefix, name.given, name.family].flat().filter(Boolean).join(" ") || reference;
        })
        .catch(() => reference),
    );
  }
  return names.get(reference);
}

/**
 * A row of the history, drawn from the entry's verified bytes where the server sent them
 * (so what is shown is what was proved), else from the AuditEvent.
 */
function entryRow(event, parts, result, name) {
  const entry = result.entry;
  const actor = entry ? entry.actor : {};
  const refused = entry ? entry.outcome === "deny" : event.outcome !== "0";
  const purpose = entry ? actor.purpose : event.agent?.[0]?.purposeOfUse?.[0]?.coding?.[0]?.code;
  const glass = purpose === "ETREAT";
  const identity = entry ? who(actor) : event.agent?.[0]?.who?.reference || event.agent?.[0]?.name;
  const action = entry ? ACTIONS[entry.action] || entry.action : event.subtype?.[0]?.code || event.action;
  const what = entry
    ? entry.resources.map((r) => `${r.type}/${r.id}${r.versionId ? ` (version ${r.versionId})` : ""}`).join(", ")
    : (event.entity || []).map((e) => e.what?.reference).join(", ");
  const when = new Date((entry && entry.time) || event.recorded);
  // The signed-in user's own visits to this page are accesses too, but rarely news to them.
  const ownView = Boolean(entry && entry.action === "audit-view" && actor.subject === session.claims.sub);
  const reason = entry ? [entry.reason, entry.rule && `rule ${entry.rule}`].filter(Boolean).join("; ") : event.outcomeDesc;
  return element(
    "article",
    {
      class: `row${refused ? " refused" : ""}${glass ? " glass" : ""}${ownView ? " own-view" : ""}`,
      "data-index": parts.index || "",
    },
    element(
      "h4",
      {},
      `${name || identity}: ${refused ? `tried to ${action}` : action}`,
      element("span", { class: `badge${refused ? " refused" : ""}` }, refused ? "Refused" : "Permitted"),
      glass ? element("span", { class: "badge glass" }, "Break-the-glass") : null,
    ),
    facts([
      ["Who", name && name !== identity ? `${name} (${identity})` : identity],
      ["When", when.toLocaleString()],
      ["What", what],
      ["App", actor.client],
      ["Why", purpose ? `purpose ${purpose}${glass ? " (emergency access, for review)" : ""}` : null],
      [refused ? "Refused because" : "Permitted by", reason || (entry && entry.rule)],
      ["Receipt", entry ? entry.id : parts.receipt],
    ]),
    mark(result),
  );
}

async function renderEvents(container, bundle) {
  const events = (bundle.entry || []).map((e) => e.resource);
  for (const event of events) {
    const parts = ledgerParts(event);
    const result = await checkEntry({
      leafData: parts.leafData,
      leafHash: parts.leafHash,
      index: parts.index,
      treeSize: parts.treeSize,
      proof: parts.inclusionProof,
      checkpoint: parts.checkpoint,
    });
    const actor = result.entry ? who(result.entry.actor) : event.agent?.[0]?.who?.reference;
    container.append(entryRow(event, parts, result, await displayName(actor)));
  }
  return events.length;
}

// ---- the patient's history -------------------------------------------------------------

function historyQuery() {
  const params = new URLSearchParams();
  const patient = session.patient || $("history-patient").value.trim();
  if (patient) params.set("patient", `Patient/${patient.replace(/^Patient\//, "")}`);
  if ($("history-from").value) params.append("date", `ge${$("history-from").value}`);
  if ($("history-to").value) params.append("date", `le${$("history-to").value}`);
  if ($("history-actor").value.trim()) params.set("agent", $("history-actor").value.trim());
  params.set("_count", String(PAGE));
  return `/fhir/AuditEvent?${params}`;
}

async function showHistory(path) {
  const rows = $("history-rows");
  if (!path) rows.replaceChildren();
  say("Loading the access history\u2026");
  try {
    const { body } = await api(path || historyQuery());
    await renderEvents(rows, body);
    const next = (body.link || []).find((l) => l.relation === "next");
    session.next = next ? localPath(next.url) : null;
    $("history-more").hidden = !session.next;
    const total = rows.children.length;
    if (!total) rows.append(element("p", {}, "No accesses recorded for this selection."));
    say(`${total} access${total === 1 ? "" : "es"} shown; each checked in this browser.`);
  } catch (error) {
    say(`The access history could not be loaded (${error.message}).`, true);
  }
}

// ---- Consents ----------------------------------------------------------------------------

function consentActors(consent) {
  return (consent.provision?.actor || []).map((a) => a.reference?.reference).filter(Boolean);
}

async function showConsents() {
  const rows = $("consent-rows");
  rows.replaceChildren();
  if (!session.patient) {
    rows.append(element("p", {}, "Consents are managed by the patient's own sign-in."));
    $("grant-form").hidden = true;
    return;
  }
  try {
    const { body } = await api(`/fhir/Consent?patient=Patient/${session.patient}&_count=50`);
    const consents = (body.entry || []).map((e) => e.resource).filter((r) => r.resourceType === "Consent");
    for (const consent of consents) {
      const actors = consentActors(consent);
      const period = consent.provision?.period;
      const active = consent.status === "active";
      rows.append(
        element(
          "article",
          { class: `row${active ? "" : " refused"}`, "data-consent": consent.id },
          element("h4", {}, `${consent.provision?.type === "deny" ? "Denies" : "Permits"} ${actors.join(", ") || "any clinician"}`),
          facts([
            ["Status", consent.status],
            ["Scope", consent.scope?.coding?.[0]?.code],
            ["Until", period?.end],
            ["Recorded", consent.meta?.lastUpdated && new Date(consent.meta.lastUpdated).toLocaleString()],
          ]),
          active
            ? element("button", { type: "button", class: "danger", onclick: () => revoke(consent) }, `Revoke access for ${actors.join(", ") || "everyone"}`)
            : null,
        ),
      );
    }
    if (!consents.length) rows.append(element("p", {}, "No Consents yet: no clinician may open your record."));
  } catch (error) {
    say(`The Consents could not be loaded (${error.message}).`, true);
  }
}

async function revoke(consent) {
  const changed = { ...consent, status: "inactive" };
  try {
    await api(`/fhir/Consent/${consent.id}`, {
      method: "PUT",
      headers: { "Content-Type": "application/fhir+json", "If-Match": `W/"${consent.meta?.versionId}"` },
      body: JSON.stringify(changed),
    });
    say(`Revoked: ${consentActors(consent).join(", ") || "everyone"} may no longer open the record.`);
  } catch (error) {
    say(`The Consent could not be revoked (${error.message}).`, true);
  }
  await showConsents();
}

async function grant(event) {
  event.preventDefault();
  const actor = $("grant-actor").value.trim();
  const until = $("grant-until").value;
  const consent = {
    resourceType: "Consent",
    status: "active",
    scope: { coding: [{ system: "http://terminology.hl7.org/CodeSystem/consentscope", code: "patient-privacy" }] },
    category: [{ coding: [{ system: "http://loinc.org", code: "59284-0" }] }],
    patient: { reference: `Patient/${session.patient}` },
    dateTime: new Date().toISOString(),
    policyRule: { coding: [{ system: "http://terminology.hl7.org/CodeSystem/v3-ActCode", code: "OPTIN" }] },
    provision: {
      type: "permit",
      actor: [
        {
          role: { coding: [{ system: "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", code: "PRCP" }] },
          reference: { reference: actor },
        },
      ],
      ...(until ? { period: { end: until } } : {}),
    },
  };
  try {
    await api("/fhir/Consent", {
      method: "POST",
      headers: { "Content-Type": "application/fhir+json" },
      body: JSON.stringify(consent),
    });
    $("grant-form").reset();
    say(`Granted: ${actor} may open the record${until ? ` until ${until}` : ""}.`);
  } catch (error) {
    say(`The Consent could not be granted (${error.message}).`, true);
  }
  await showConsents();
}

// ---- the auditor's view ------------------------------------------------------------------

async function showLog() {
  const state = $("log-state");
  const consistency = $("log-consistency");
  state.replaceChildren();
  let witnesses = [];
  try {
    witnesses = (await api("/ledger/witnesses")).body;
    $("log-witnesses").replaceChildren(
      witnesses.length
        ? element(
            "ul",
            {},
            witnesses.map((w) =>
              element(
                "li",
                {},
                `${w.name}: ${w.cosigned_size === null ? "has cosigned nothing yet" : `cosigned up to ${w.cosigned_size} entries`}` +
                  (w.last_error ? ` (last submission failed: ${w.last_error})` : ""),
              ),
            ),
          )
        : element("p", {}, "No witnesses are configured."),
    );
  } catch (error) {
    $("log-witnesses").textContent = `Unknown (${error.message}).`;
  }
  try {
    const note = await (await fetch("/ledger/checkpoint", { cache: "no-store" })).text();
    const checkpoint = verify.parseCheckpoint(note);
    const signed = await verify.signedBy(checkpoint, session.key);
    const witnessed = witnesses.length ? await fetch("/ledger/checkpoint/cosigned", { cache: "no-store" }) : null;
    const cosigned = witnessed && witnessed.ok ? verify.parseCheckpoint(await witnessed.text()) : null;
    state.append(
      ...facts([
        ["Log", checkpoint.origin],
        ["Entries", String(checkpoint.size)],
        ["Root", verify.toHex(checkpoint.root)],
        ["Signature", signed ? `\u2714 valid under the pinned key ${session.key.id}` : `\u2718 not signed by the pinned key ${session.key.id}`],
        [
          "Witnessed",
          cosigned
            ? `${cosigned.signatures.length - 1} cosignature(s) on the checkpoint of ${cosigned.size} entries`
            : "no witness has cosigned a checkpoint",
        ],
      ]).childNodes,
    );
    consistency.textContent = await checkConsistency(checkpoint, signed);
  } catch (error) {
    say(`The log's state could not be read (${error.message}).`, true);
  }
}

/** Compares the checkpoint with the last one this browser saw, and remembers it if it holds. */
async function checkConsistency(checkpoint, signed) {
  if (!signed) return "\u2718 Not remembered: the checkpoint's signature does not verify.";
  const seen = JSON.parse(localStorage.getItem(LAST_CHECKPOINT) || "null");
  let verdict;
  if (!seen || seen.origin !== checkpoint.origin) {
    verdict = `First checkpoint this browser sees (${checkpoint.size} entries); the next visit checks the log only grew from it.`;
  } else if (seen.size > checkpoint.size) {
    return `\u2718 Not consistent: this browser saw ${seen.size} entries, the log now claims ${checkpoint.size}.`;
  } else {
    const { body } = await api(`/ledger/proof/consistency?first=${seen.size}&second=${checkpoint.size}`);
    const ok = await verify.consistent(
      seen.size,
      checkpoint.size,
      verify.fromBase64(seen.root),
      checkpoint.root,
      (body.proof || []).map(verify.fromBase64),
    );
    if (!ok) return `\u2718 Not consistent with the checkpoint of ${seen.size} entries this browser saw: the log was rewritten.`;
    verdict = `\u2714 Consistent: the log of ${checkpoint.size} entries extends the one of ${seen.size} this browser saw.`;
  }
  localStorage.setItem(
    LAST_CHECKPOINT,
    JSON.stringify({ origin: checkpoint.origin, size: checkpoint.size, root: verify.toBase64(checkpoint.root) }),
  );
  return verdict;
}

async function showGlass() {
  const rows = $("glass-rows");
  rows.replaceChildren();
  try {
    const { body } = await api(`/fhir/AuditEvent?purpose=ETREAT&_count=${PAGE}`);
    if (!(await renderEvents(rows, body))) rows.append(element("p", {}, "No break-the-glass access is recorded."));
  } catch (error) {
    rows.append(element("p", {}, `Unavailable (${error.message}).`));
  }
}

async function showRefusals() {
  const counts = new Map();
  let path = "/fhir/AuditEvent?outcome=4&_count=100";
  let seen = 0;
  try {
    while (path && seen < 500) {
      const { body } = await api(path);
      for (const entry of body.entry || []) {
        const description = entry.resource.outcomeDesc || "";
        const rule = (description.match(/rule: (.*)$/) || [])[1] || description || "unstated";
        counts.set(rule, (counts.get(rule) || 0) + 1);
        seen++;
      }
      const next = (body.link || []).find((l) => l.relation === "next");
      path = next ? localPath(next.url) : null;
    }
  } catch (error) {
    say(`Refusals could not be counted (${error.message}).`, true);
  }
  const rows = [...counts].sort((a, b) => b[1] - a[1]).map(([rule, n]) => element("tr", {}, element("td", {}, rule), element("td", {}, String(n))));
  $("refusals").tBodies[0].replaceChildren(...(rows.length ? rows : [element("tr", {}, element("td", { colspan: "2" }, "No refusals."))]));
}

async function lookUpReceipt(event) {
  event.preventDefault();
  const result = $("receipt-result");
  result.replaceChildren();
  try {
    const { body } = await api(`/ledger/receipts/${encodeURIComponent($("receipt").value.trim())}`);
    if (!body.inclusion) {
      result.append(element("p", {}, "The entry is recorded but not sequenced yet; look again in a moment."));
      return;
    }
    const checked = await checkEntry({
      leafData: body.leaf_data,
      index: body.inclusion.leaf_index,
      treeSize: body.inclusion.tree_size,
      proof: body.inclusion.proof,
      checkpoint: body.checkpoint,
    });
    const parts = { index: String(body.index), receipt: body.receipt };
    result.append(entryRow({}, parts, checked, checked.entry && (await displayName(who(checked.entry.actor)))));
  } catch (error) {
    result.append(element("p", {}, `No such receipt here (${error.message}).`));
  }
}

// ---- sign-in and navigation --------------------------------------------------------------

function show(view) {
  for (const name of ["history", "consents", "auditor"]) {
    $(`view-${name}`).hidden = name !== view;
    $(`tab-${name}`).setAttribute("aria-pressed", String(name === view));
  }
  if (view === "consents") showConsents();
  if (view === "auditor") Promise.all([showLog(), showGlass(), showRefusals()]);
}

async function signIn(token, patientFromLaunch) {
  let claims = {};
  try {
    claims = JSON.parse(base64UrlDecode(token.split(".")[1] || ""));
  } catch {
    // An opaque token: the server decides what it may see; the page shows what it is given.
  }
  const scopes = String(claims.scope || "").split(/\s+/);
  session.token = token;
  session.claims = claims;
  session.patient = patientFromLaunch || claims.patient || null;
  session.auditor = scopes.includes("ledger.read") || scopes.some((s) => s.startsWith("system/"));
  session.readsResources = scopes.some((s) => /^(patient|user|system)\//.test(s));
  try {
    const pinned = await pinnedKey();
    session.key = pinned.key;
    describeKey($("history-key"), pinned);
  } catch (error) {
    say(`The ledger key could not be read (${error.message}).`, true);
    return;
  }
  $("token").value = "";
  $("sign-in").hidden = true;
  $("tabs").hidden = false;
  $("tab-consents").hidden = !session.patient;
  $("tab-auditor").hidden = !session.auditor;
  $("history-patient-field").hidden = Boolean(session.patient);
  $("history-subject").textContent = session.patient
    ? "Everyone who opened, changed or tried to open your record, newest first."
    : "Name a patient to list who touched their record, or leave it empty for every entry.";
  show("history");
  $("main").focus();
  await showHistory();
}

function signOut() {
  session.token = null;
  session.claims = {};
  session.patient = null;
  location.replace("/portal");
}

// SMART standalone launch (App Launch 2.x) with PKCE S256, when the server names an
// identity provider and a client id for the portal. Only the PKCE verifier and state cross
// the redirect, in this tab's sessionStorage, and are removed on return.
async function smartConfig() {
  const response = await fetch("/portal/config.json", { cache: "no-store" });
  return response.ok ? response.json() : {};
}

async function smartLaunch(config) {
  const verifier = base64Url(crypto.getRandomValues(new Uint8Array(32)));
  const state = base64Url(crypto.getRandomValues(new Uint8Array(16)));
  const challenge = base64Url(new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier))));
  sessionStorage.setItem(SMART_PENDING, JSON.stringify({ verifier, state }));
  const query = new URLSearchParams({
    response_type: "code",
    client_id: config.client_id,
    redirect_uri: config.redirect_uri,
    scope: config.scope,
    state,
    aud: config.aud,
    code_challenge: challenge,
    code_challenge_method: "S256",
  });
  location.assign(`${config.authorization_endpoint}?${query}`);
}

async function smartReturn(config, params) {
  const pending = JSON.parse(sessionStorage.getItem(SMART_PENDING) || "null");
  sessionStorage.removeItem(SMART_PENDING);
  // The code and state leave the address bar and the history at once.
  history.replaceState(null, "", "/portal");
  if (params.get("error")) {
    say(`The provider did not sign you in (${params.get("error")}).`, true);
    return;
  }
  if (!pending || pending.state !== params.get("state")) {
    say("The sign-in answer does not belong to this tab's sign-in; start again.", true);
    return;
  }
  const response = await fetch(config.token_endpoint, {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({
      grant_type: "authorization_code",
      code: params.get("code"),
      redirect_uri: config.redirect_uri,
      client_id: config.client_id,
      code_verifier: pending.verifier,
    }),
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok || !answer.access_token) {
    say(`The provider refused the sign-in (${answer.error || response.status}).`, true);
    return;
  }
  await signIn(answer.access_token, answer.patient);
}

async function start() {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("token").value.trim());
  });
  $("history-filter").addEventListener("submit", (event) => {
    event.preventDefault();
    showHistory();
  });
  $("history-more").addEventListener("click", () => showHistory(session.next));
  $("history-own").addEventListener("change", (event) => {
    $("history-rows").classList.toggle("show-own", event.target.checked);
  });
  $("grant-form").addEventListener("submit", grant);
  $("receipt-form").addEventListener("submit", lookUpReceipt);
  $("sign-out").addEventListener("click", signOut);
  for (const tab of document.querySelectorAll("[data-view]")) {
    tab.addEventListener("click", () => show(tab.dataset.view));
  }
  const config = await smartConfig();
  if (config.authorization_endpoint) {
    $("smart-sign-in").hidden = false;
    $("smart-launch").addEventListener("click", () => smartLaunch(config));
    const params = new URLSearchParams(location.search);
    if (params.has("code") || params.has("error")) await smartReturn(config, params);
  }
}

start();
