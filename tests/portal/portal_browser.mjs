// Drives /portal in headless chromium (puppeteer-core, Debian's chromium) for tests/portal.sh,
// which made the accesses and passes their actors, tokens and a receipt in PORTAL_* variables.
// Each check prints "ok: …" or throws; screenshots go to PORTAL_ARTIFACTS.
import { createRequire } from "node:module";
import { join } from "node:path";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set (tests/portal.sh sets it)`);
  return value;
};
const base = env("PORTAL_URL");
const patient = env("PORTAL_PATIENT");
const artifacts = env("PORTAL_ARTIFACTS");
const puppeteer = createRequire(join(env("PORTAL_NODE"), "package.json"))("puppeteer-core");
const smartPhase = process.env.PORTAL_PHASE === "smart";

let passed = 0;
function check(condition, what, detail = "") {
  if (!condition) throw new Error(`portal: ${what}${detail ? `\n${detail}` : ""}`);
  console.log(`ok: ${what}`);
  passed++;
}

async function fhir(path, token) {
  const response = await fetch(`${base}${path}`, {
    headers: { Authorization: `Bearer ${token}`, Accept: "application/fhir+json" },
  });
  return { status: response.status, body: await response.json().catch(() => null) };
}

// The view lists entries once a checkpoint covers them: wait for the three accesses.
for (let attempt = 0; !smartPhase; attempt++) {
  const { body } = await fhir(`/fhir/AuditEvent?patient=Patient/${patient}&_count=50`, env("PORTAL_AUDITOR_TOKEN"));
  const names = (body?.entry || []).map((e) => e.resource.agent?.[0]?.name);
  if (names.filter((n) => n === "dr-adams").length >= 1 && names.filter((n) => n === "dr-baker").length >= 2) break;
  if (attempt > 100) throw new Error("portal: the three accesses never appeared in the AuditEvent view");
  await new Promise((resolve) => setTimeout(resolve, 100));
}

const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // Only this server resolves: the page must need no other host.
  args: ["--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"],
});
const problems = [];

async function open(viewport = { width: 1200, height: 900 }) {
  const page = await browser.newPage();
  await page.setViewport(viewport);
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error") problems.push(`console: ${message.text()} (${message.location().url})`);
  });
  return page;
}

async function signIn(page, token) {
  await page.goto(`${base}/portal`, { waitUntil: "networkidle0" });
  await page.type("#token", token);
  await page.click("#token-form button[type=submit]");
  await page.waitForFunction(() => /shown|could not/.test(document.getElementById("status").textContent), { timeout: 20000 });
}

/** Each history row: its heading, mark and text. */
function rows(page, container = "#history-rows") {
  return page.$$eval(`${container} article`, (articles) =>
    articles.map((a) => ({
      index: a.dataset.index,
      heading: a.querySelector("h4").textContent,
      mark: a.querySelector(".mark").textContent,
      verified: Boolean(a.querySelector(".mark.verified")),
      text: a.textContent,
    })),
  );
}

/**
 * SMART standalone launch: the page sends the browser to the provider with a PKCE
 * challenge, the provider sends it back with a code, the page exchanges code and verifier
 * for the token, and the address bar and storage are clean again.
 */
async function smartLaunch() {
  const page = await open();
  const redirects = [];
  page.on("request", (request) => {
    if (request.url().startsWith(`${base}/portal?`)) redirects.push(request.url());
  });
  const policy = (await page.goto(`${base}/portal`, { waitUntil: "networkidle0" })).headers()["content-security-policy"];
  check(policy.includes(`connect-src 'self' ${env("PORTAL_IDP")}`), "the page may call the provider's token endpoint, and no other host", policy);
  const launch = await page.waitForSelector("#smart-launch", { visible: true });
  await launch.click();
  // Off to the provider and back: wait for the page that came back to settle.
  await page.waitForFunction(
    () => /shown|could not|refused|does not belong/.test(document.getElementById("status")?.textContent || ""),
    { timeout: 20000 },
  ).catch(async (error) => {
    const seen = await page.evaluate(() => `${location.href}: ${document.getElementById("status")?.textContent}`);
    throw new Error(`portal: the launch did not come back signed in (${seen}; ${problems.join("; ")})`, { cause: error });
  });
  const status = await page.$eval("#status", (s) => s.textContent);
  check(/shown/.test(status), "the launch signs the patient in and lists their record's accesses", status);
  const shown = await rows(page);
  check(shown.length >= 1 && shown.every((r) => r.verified), "the launched session's rows are verified", JSON.stringify(shown));
  const kept = await page.evaluate(() => ({ url: location.href, session: sessionStorage.length }));
  check(kept.url === `${base}/portal` && kept.session === 0, "after the launch no code, state or verifier is left in the URL or storage", JSON.stringify(kept));
  // The same redirect again (a copied link, a replay) signs nobody in: this tab has no
  // pending launch for its state.
  check(redirects.length === 1 && /code=/.test(redirects[0]), "the provider redirected back once with a code", redirects.join(" "));
  await page.goto(redirects[0], { waitUntil: "networkidle0" });
  await page.waitForFunction(() => document.getElementById("status").textContent.length > 0);
  const replay = await page.$eval("#status", (s) => s.textContent);
  check(/does not belong/.test(replay) && !(await page.$("#history-rows article")), "a replayed redirect signs nobody in", replay);
  check(problems.length === 0, "no script errors during the launch", problems.join("\n"));
}

try {
  if (smartPhase) {
    await smartLaunch();
  } else {
    await patientAndAuditor();
  }
} finally {
  await browser.close();
}
console.log(`portal: ${passed} checks passed; screenshots in ${artifacts}`);

async function patientAndAuditor() {
  const drA = env("PORTAL_DR_A");
  const drB = env("PORTAL_DR_B");
  // ---- the patient, signing in with the keyboard only ------------------------------------
  const page = await open();
  await page.goto(`${base}/portal`, { waitUntil: "networkidle0" });
  const unlabelled = await page.$$eval("input, textarea", (fields) => fields.filter((f) => !f.labels.length).map((f) => f.id));
  check(unlabelled.length === 0, "every field of the page has a label", unlabelled.join(", "));
  const reached = [];
  for (let i = 0; i < 4 && reached.at(-1) !== "token"; i++) {
    await page.keyboard.press("Tab");
    reached.push(await page.evaluate(() => document.activeElement.id || document.activeElement.className || document.activeElement.tagName));
  }
  check(reached.at(-1) === "token" && reached.length <= 2, "the keyboard reaches the token field (after the skip link)", reached.join(" -> "));
  await page.keyboard.type(env("PORTAL_PATIENT_TOKEN"));
  await page.keyboard.press("Tab");
  await page.keyboard.press("Enter");
  await page.waitForFunction(() => /shown|could not/.test(document.getElementById("status").textContent), { timeout: 20000 });
  const history = await rows(page);
  const byA = history.filter((r) => r.heading.startsWith("Dr Anna Adams") && r.text.includes(`(${drA})`));
  const byB = history.filter((r) => r.heading.startsWith("Dr Ben Baker") && r.text.includes(`(${drB})`));
  check(byA.some((r) => r.heading.includes("Permitted")), "the patient sees Dr A's permitted read, by name", JSON.stringify(history, null, 1));
  check(byB.some((r) => r.heading.includes("Refused") && /rule consent/.test(r.text)), "the patient sees Dr B's refused read, with the rule");
  check(byB.some((r) => r.heading.includes("Break-the-glass") && r.text.includes("ETREAT")), "the patient sees Dr B's break-the-glass read, flagged");
  check(history.length >= 3 && history.every((r) => r.verified), `every one of the ${history.length} rows is verified in the browser`,
    history.filter((r) => !r.verified).map((r) => `${r.heading}: ${r.mark}`).join("\n"));
  const times = await page.$$eval("#history-rows article", (a) => a.map((x) => Number(x.dataset.index)));
  check(times.every((t, i) => i === 0 || times[i - 1] > t), "newest first");
  await page.screenshot({ path: join(artifacts, "portal-patient.png"), fullPage: true });

  // Filters: by actor, then a date range that holds nothing.
  await page.type("#history-actor", drA);
  await page.click("#history-filter button[type=submit]");
  await page.waitForFunction(() => /shown|could not/.test(document.getElementById("status").textContent));
  await page.waitForFunction(() => !document.getElementById("status").textContent.startsWith("Loading"));
  const filtered = await rows(page);
  check(filtered.length >= 1 && filtered.every((r) => r.text.includes(`(${drA})`)), "the actor filter shows Dr A's accesses only");
  await page.evaluate(() => { document.getElementById("history-actor").value = ""; });
  await page.$eval("#history-to", (input) => { input.value = "2001-01-01"; });
  await page.click("#history-filter button[type=submit]");
  await page.waitForFunction(() => document.getElementById("history-rows").textContent.includes("No accesses"));
  check(true, "a date range before the accesses shows none");
  await page.$eval("#history-to", (input) => { input.value = ""; });

  // ---- a phone's screen ----------------------------------------------------------------
  const phone = await open({ width: 390, height: 844, isMobile: true, hasTouch: true, deviceScaleFactor: 2 });
  await signIn(phone, env("PORTAL_PATIENT_TOKEN"));
  const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 0, "on a phone-sized screen the page needs no sideways scrolling", `overflow ${overflow}px`);
  await phone.screenshot({ path: join(artifacts, "portal-phone.png"), fullPage: true });
  await phone.close();

  // ---- a tampered proof, and tampered entry bytes ---------------------------------------
  const tampered = await open();
  await tampered.setRequestInterception(true);
  const changed = {};
  tampered.on("request", async (request) => {
    if (!request.url().includes("/fhir/AuditEvent")) return request.continue();
    const answer = await fetch(request.url(), { headers: request.headers() });
    const bundle = await answer.json();
    for (const entry of bundle.entry || []) {
      const parts = entry.resource.extension[0].extension;
      const index = parts.find((p) => p.url === "index").valueString;
      const name = entry.resource.agent[0].name;
      const proof = parts.find((p) => p.url === "inclusionProof");
      if (name === "dr-baker" && !changed.proof && proof) {
        // One bit of one proof hash flipped.
        const bytes = Buffer.from(proof.valueString, "base64");
        bytes[0] ^= 1;
        proof.valueString = bytes.toString("base64");
        changed.proof = index;
      } else if (name === "dr-adams" && !changed.bytes) {
        // The entry's bytes say someone else acted.
        const data = parts.find((p) => p.url === "leafData");
        data.valueBase64Binary = Buffer.from(
          Buffer.from(data.valueBase64Binary, "base64").toString().replace("dr-adams", "dr-other"),
        ).toString("base64");
        changed.bytes = index;
      }
    }
    request.respond({ status: answer.status, contentType: "application/fhir+json", body: JSON.stringify(bundle) });
  });
  await signIn(tampered, env("PORTAL_PATIENT_TOKEN"));
  const shown = await rows(tampered);
  const proofRow = shown.find((r) => r.index === changed.proof);
  const bytesRow = shown.find((r) => r.index === changed.bytes);
  check(proofRow && !proofRow.verified && /Not verified: the inclusion proof does not lead/.test(proofRow.mark),
    "a row whose proof was changed in transit shows \u201cNot verified\u201d and why", JSON.stringify(proofRow));
  check(bytesRow && !bytesRow.verified && /Not verified/.test(bytesRow.mark),
    "a row whose entry bytes were changed in transit shows \u201cNot verified\u201d", JSON.stringify(bytesRow));
  check(shown.filter((r) => r.index !== changed.proof && r.index !== changed.bytes).every((r) => r.verified),
    "the rows nobody changed still verify");
  await tampered.screenshot({ path: join(artifacts, "portal-tampered.png"), fullPage: true });
  await tampered.close();

  // ---- revoking the Consent on the page --------------------------------------------------
  check((await fhir(`/fhir/Patient/${patient}`, env("PORTAL_DR_A_TOKEN"))).status === 200, "before: Dr A may read the record");
  await page.click("#tab-consents");
  const revoke = await page.waitForSelector(`xpath///button[contains(., "Revoke access for ${drA}")]`);
  await page.screenshot({ path: join(artifacts, "portal-consents.png"), fullPage: true });
  await revoke.click();
  await page.waitForFunction(() => /Revoked|could not/.test(document.getElementById("status").textContent));
  const status = await page.$eval("#status", (s) => s.textContent);
  check(status.startsWith("Revoked"), "the page revokes the Consent", status);
  const after = await fhir(`/fhir/Patient/${patient}`, env("PORTAL_DR_A_TOKEN"));
  check(after.status === 403, "after: Dr A's next read is refused", JSON.stringify(after.body));
  await page.waitForSelector("#consent-rows article");
  check(!(await page.$(`xpath///button[contains(., "Revoke access for ${drA}")]`)), "the revoked Consent offers no revoke button any more");

  // Granting again from the page opens the record again.
  await page.type("#grant-actor", drA);
  await page.click("#grant-form button[type=submit]");
  await page.waitForFunction(() => /Granted|could not/.test(document.getElementById("status").textContent));
  check((await fhir(`/fhir/Patient/${patient}`, env("PORTAL_DR_A_TOKEN"))).status === 200, "a Consent granted on the page lets Dr A read again");

  // By now the patient has visited the history several times: those visits are listed too.
  await page.click("#tab-history");
  await page.click("#history-filter button[type=submit]");
  await page.waitForFunction(() => / shown/.test(document.getElementById("status").textContent));
  const visible = await page.$$eval("#history-rows article", (a) => a.filter((x) => x.offsetParent !== null).map((x) => x.textContent));
  check(visible.length >= 3 && !visible.some((t) => t.startsWith("peter: viewed")), "the patient's own visits to the page are hidden unless asked for", visible.join("\n"));
  await page.click("#history-own");
  const withOwn = await page.$$eval("#history-rows article", (a) => a.filter((x) => x.offsetParent !== null).length);
  check(withOwn > visible.length, "and shown when asked for");
  await page.click("#history-own");

  // ---- the auditor ------------------------------------------------------------------------
  const auditor = await open();
  await signIn(auditor, env("PORTAL_AUDITOR_TOKEN"));
  await auditor.click("#tab-auditor");
  await auditor.waitForFunction(() => document.getElementById("log-consistency").textContent.length > 0, { timeout: 20000 });
  const state = await auditor.$eval("#log-state", (s) => s.textContent);
  check(/valid under the pinned key/.test(state), "the auditor sees the checkpoint's signature valid", state);
  check(/First checkpoint/.test(await auditor.$eval("#log-consistency", (s) => s.textContent)), "the first visit remembers the checkpoint");
  await auditor.waitForSelector("#glass-rows article, #glass-rows p");
  const glass = await rows(auditor, "#glass-rows");
  check(glass.length >= 1 && glass.every((r) => r.verified && r.heading.includes("Break-the-glass")),
    "break-the-glass entries are listed for review, verified", JSON.stringify(glass));
  await auditor.waitForFunction(() => document.querySelector("#refusals tbody").textContent.length > 0);
  const refusals = await auditor.$$eval("#refusals tbody tr", (trs) => trs.map((tr) => [...tr.cells].map((c) => c.textContent)));
  check(refusals.some(([rule, n]) => rule === "consent" && Number(n) >= 2), "refusals are counted by rule (consent: Dr B's, Dr A's after the revoke)", JSON.stringify(refusals));
  await auditor.type("#receipt", env("PORTAL_RECEIPT"));
  await auditor.click("#receipt-form button[type=submit]");
  await auditor.waitForSelector("#receipt-result article, #receipt-result p");
  const looked = await rows(auditor, "#receipt-result");
  check(looked.length === 1 && looked[0].verified && looked[0].text.includes(drA), "a receipt looked up shows its entry, verified", JSON.stringify(looked));
  await auditor.screenshot({ path: join(artifacts, "portal-auditor.png"), fullPage: true });
  // A later visit in the same browser checks the log only grew.
  await fhir(`/fhir/Patient/${patient}`, env("PORTAL_DR_A_TOKEN"));
  await new Promise((resolve) => setTimeout(resolve, 1500));
  await signIn(auditor, env("PORTAL_AUDITOR_TOKEN"));
  await auditor.click("#tab-auditor");
  await auditor.waitForFunction(() => document.getElementById("log-consistency").textContent.length > 0, { timeout: 20000 });
  const consistency = await auditor.$eval("#log-consistency", (s) => s.textContent);
  check(/^\u2714 Consistent/.test(consistency), "a later visit proves the log consistent with the one it saw", consistency);

  // ---- nothing about the patient in the address bar or the browser's storage -------------
  for (const [who, p] of [["patient", page], ["auditor", auditor]]) {
    const kept = await p.evaluate(() => ({
      url: location.href,
      local: Object.fromEntries(Object.entries(localStorage)),
      session: sessionStorage.length,
    }));
    check(kept.url === `${base}/portal` && kept.session === 0 &&
      Object.keys(kept.local).every((k) => k.startsWith("fhirledger.portal.")) &&
      !JSON.stringify(kept.local).includes(patient) && !JSON.stringify(kept.local).includes("eyJ"),
      `the ${who}'s page keeps no token or patient in its URL or storage`, JSON.stringify(kept));
  }
  check(problems.length === 0, "no script errors on any page", problems.join("\n"));
}
