// The portal's in-browser checks (src/api/portal/verify.js) against RFC 6962 vectors from
// ../shared/fixtures/merkle: every happy-path inclusion and consistency proof verifies, and
// the same proof with one bit flipped, or for another leaf or size, does not. Exits 1 on the
// first failure. Run by tests/browser.sh (Node 20 has WebCrypto's SHA-256 and Ed25519).
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";
import * as verify from "../../src/api/portal/verify.js";

const here = dirname(fileURLToPath(import.meta.url));
const vectors = JSON.parse(
  readFileSync(join(here, "../../../shared/fixtures/merkle/rfc6962-vectors.json"), "utf8"),
);
const hex = (text) => Uint8Array.from(text.match(/../g) || [], (byte) => parseInt(byte, 16));
const flipped = (bytes) => {
  const copy = bytes.slice();
  copy[0] ^= 1;
  return copy;
};
let checked = 0;
function expect(condition, what) {
  if (!condition) {
    console.error(`portal verify: ${what}`);
    process.exit(1);
  }
  checked++;
}

for (const [i, input] of vectors.leaf_inputs_hex.entries()) {
  const leaf = await verify.leafHash(hex(input));
  expect(verify.toHex(leaf) === vectors.leaf_hashes_hex[i], `leaf hash ${i}`);
}
for (const c of vectors.inclusion) {
  const proof = c.proof.map(hex);
  const root = await verify.rootFromInclusion(c.leafIdx, c.treeSize, hex(c.leafHash), proof);
  expect(verify.toHex(root) === c.root, `inclusion ${c.file}`);
  if (proof.length) {
    const bad = await verify.rootFromInclusion(c.leafIdx, c.treeSize, hex(c.leafHash), [flipped(proof[0]), ...proof.slice(1)]);
    expect(verify.toHex(bad) !== c.root, `a flipped inclusion proof still verifies: ${c.file}`);
    const shortened = verify.rootFromInclusion(c.leafIdx, c.treeSize, hex(c.leafHash), proof.slice(1));
    expect(await shortened.then((r) => verify.toHex(r) !== c.root, () => true), `a shortened proof verifies: ${c.file}`);
  }
}
for (const c of vectors.consistency) {
  const proof = c.proof.map(hex);
  expect(await verify.consistent(c.size1, c.size2, hex(c.root1), hex(c.root2), proof), `consistency ${c.file}`);
  if (proof.length) {
    expect(!(await verify.consistent(c.size1, c.size2, hex(c.root1), hex(c.root2), [flipped(proof[0]), ...proof.slice(1)])),
      `a flipped consistency proof still verifies: ${c.file}`);
    expect(!(await verify.consistent(c.size1, c.size2, flipped(hex(c.root1)), hex(c.root2), proof)),
      `consistency with another first root: ${c.file}`);
  }
}

// A signed note made here with WebCrypto's Ed25519, checked as the portal checks the log's.
const pair = await crypto.subtle.generateKey({ name: "Ed25519" }, true, ["sign", "verify"]);
const publicKey = new Uint8Array(await crypto.subtle.exportKey("raw", pair.publicKey));
const name = "example.org/log";
const idBytes = new Uint8Array(
  await crypto.subtle.digest("SHA-256", new Uint8Array([...new TextEncoder().encode(name + "\n"), 1, ...publicKey])),
).slice(0, 4);
const key = verify.parseVerifierKey(`${name}+${verify.toHex(idBytes)}+${verify.toBase64(Uint8Array.of(1, ...publicKey))}`);
const root = hex(vectors.roots_by_size_hex["8"]);
const text = `${name}\n8\n${verify.toBase64(root)}\n`;
const signature = new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" }, pair.privateKey, new TextEncoder().encode(text)));
const note = `${text}\n\u2014 ${name} ${verify.toBase64(Uint8Array.of(...idBytes, ...signature))}\n`;
const inclusion = vectors.inclusion.find((c) => c.treeSize === 8);
const entry = { leaf: hex(inclusion.leafHash), index: inclusion.leafIdx, treeSize: 8, proof: inclusion.proof.map(hex), note, key };
expect((await verify.verifyEntry(entry)).verified, "a good entry under a good note");
const forged = note.replace(`\n8\n`, `\n8\n`).replace(verify.toBase64(root), verify.toBase64(flipped(root)));
expect(!(await verify.verifyEntry({ ...entry, note: forged })).verified, "a note whose root was changed");
const other = await crypto.subtle.generateKey({ name: "Ed25519" }, true, ["sign", "verify"]);
const otherKey = { ...key, publicKey: new Uint8Array(await crypto.subtle.exportKey("raw", other.publicKey)) };
expect(!(await verify.verifyEntry({ ...entry, key: otherKey })).verified, "a note under another key");
expect(!(await verify.verifyEntry({ ...entry, treeSize: 7 })).verified, "a proof for another size");
console.log(`portal verify: ${checked} checks passed`);
