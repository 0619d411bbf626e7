// Drives a running fhirledger with fhir-kit-client (from npm), as an app built on it would:
// each interaction once, one line each, exit 1 when any failed. Environment: FHIR_BASE (the
// base URL; fhir-kit-client is given it with a trailing slash, as users often write it) and
// FHIR_TOKEN (a system/*.cruds bearer token). tests/real_clients.sh runs it.
import { Client } from 'fhir-kit-client';
const base = process.env.FHIR_BASE.replace(/\/?$/, '/');
const client = new Client({ baseUrl: base, bearerToken: process.env.FHIR_TOKEN });
const results = [];
// A step fails when its check does not hold, not only when the client throws.
function expect(value, wanted, what) {
  if (JSON.stringify(value) !== JSON.stringify(wanted)) throw new Error(`${what}: got ${JSON.stringify(value)}, wanted ${JSON.stringify(wanted)}`);
  return String(value);
}
async function step(name, fn) {
  try { const d = await fn(); results.push(`ok    ${name}${d ? ': ' + d : ''}`); }
  catch (e) { results.push(`FAIL  ${name}: ${e.response ? e.response.status + ' ' + JSON.stringify(e.response.data).slice(0, 200) : e.message}`); }
}
(async () => {
  let p;
  await step('capabilityStatement', async () => expect((await client.capabilityStatement()).fhirVersion, '4.0.1', 'fhirVersion'));
  await step('create', async () => { p = await client.create({ resourceType: 'Patient', body: { resourceType: 'Patient', name: [{ family: 'Kit' }] } }); return p.id; });
  await step('read', async () => expect((await client.read({ resourceType: 'Patient', id: p.id })).name[0].family, 'Kit', 'family'));
  await step('vread', async () => expect((await client.vread({ resourceType: 'Patient', id: p.id, version: '1' })).meta.versionId, '1', 'versionId'));
  await step('update', async () => (await client.update({ resourceType: 'Patient', id: p.id, body: { resourceType: 'Patient', id: p.id, name: [{ family: 'Kit' }], active: true } })).meta.versionId === '2' ? 'version 2' : (() => { throw new Error('not version 2'); })());
  await step('patch (JSON Patch)', async () => expect((await client.patch({ resourceType: 'Patient', id: p.id, jsonPatch: [{ op: 'replace', path: '/active', value: false }] })).active, false, 'active'));
  for (let i = 0; i < 3; i++) await client.create({ resourceType: 'Observation', body: { resourceType: 'Observation', status: 'final', code: { text: 'w' }, subject: { reference: `Patient/${p.id}` } } });
  await step('search + nextPage', async () => { const b = await client.search({ resourceType: 'Observation', searchParams: { subject: `Patient/${p.id}`, _count: 2 } }); const n = await client.nextPage({ bundle: b }); return expect([b.entry.length, n.entry.length], [2, 1], 'page sizes'); });
  await step('compartment search', async () => expect((await client.search({ resourceType: 'Observation', compartment: { resourceType: 'Patient', id: p.id } })).total, 3, 'total'));
  await step('system search', async () => expect((await client.search({ searchParams: { _type: 'Patient', _id: p.id } })).entry.length, 1, 'matches'));
  await step('transaction', async () => (await client.transaction({ body: { resourceType: 'Bundle', type: 'transaction', entry: [{ resource: { resourceType: 'Patient' }, request: { method: 'POST', url: 'Patient' } }] } })).entry[0].response.status.slice(0, 3) === '201' ? 'created' : (() => { throw new Error('entry not created'); })());
  await step('batch', async () => expect((await client.batch({ body: { resourceType: 'Bundle', type: 'batch', entry: [{ request: { method: 'GET', url: `Patient/${p.id}` } }] } })).entry[0].response.status.slice(0, 3), '200', 'entry status'));
  await step('history (instance/type/system)', async () => [(await client.history({ resourceType: 'Patient', id: p.id })).total, (await client.history({ resourceType: 'Patient' })).type, (await client.history()).type].join(',') === '3,history,history' ? 'instance 3 versions' : (() => { throw new Error('histories'); })());
  await step('$everything by operation() (POST)', async () => expect((await client.operation({ name: '$everything', resourceType: 'Patient', id: p.id })).entry.length, 4, 'entries'));
  await step('$everything by GET', async () => expect((await client.operation({ name: '$everything', resourceType: 'Patient', id: p.id, method: 'get' })).entry.length, 4, 'entries'));
  await step('delete', async () => { await client.delete({ resourceType: 'Patient', id: p.id }); return 'deleted'; });
  console.log(results.join('\n'));
  process.exit(results.some(r => r.startsWith('FAIL')) ? 1 : 0);
})();
