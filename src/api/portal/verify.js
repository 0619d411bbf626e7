// What the portal checks in the browser, with WebCrypto only: RFC 9162 Merkle proofs over
// SHA-256 leaves and nodes, and C2SP signed-note checkpoints under an Ed25519 verifier key.
// No page code here: tests/portal_verify.mjs runs it under Node against RFC 6962 vectors.

const encoder = new TextEncoder();

export function fromBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

export function toBase64(bytes) {
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary);
}

export function toHex(bytes) {
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, part) => n + part.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

function equal(a, b) {
  return a.length === b.length && a.every((byte, i) => byte === b[i]);
}

async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

/** RFC 9162 §2.1.1: the hash of a leaf, SHA-256(0x00 ‖ data). */
export function leafHash(data) {
  return sha256(concat(Uint8Array.of(0), data));
}

function nodeHash(left, right) {
  return sha256(concat(Uint8Array.of(1), left, right));
}

/** Halving that stays exact beyond 32 bits (JavaScript's bit operators are 32-bit). */
const half = (n) => Math.floor(n / 2);
const odd = (n) => n % 2 === 1;

/**
 * RFC 9162 §2.1.3.2: the root an inclusion proof leads to from leaf `index` of a tree of
 * `size` leaves, or an Error naming why the proof cannot be right.
 */
export async function rootFromInclusion(index, size, leaf, proof) {
  if (!(index < size)) throw new Error(`leaf ${index} is not in a tree of ${size}`);
  let fn = index;
  let sn = size - 1;
  let root = leaf;
  for (const sibling of proof) {
    if (sn === 0) throw new Error("the proof is longer than the tree is deep");
    if (odd(fn) || fn === sn) {
      root = await nodeHash(sibling, root);
      if (!odd(fn)) {
        while (!odd(fn) && fn !== 0) {
          fn = half(fn);
          sn = half(sn);
        }
      }
    } else {
      root = await nodeHash(root, sibling);
    }
    fn = half(fn);
    sn = half(sn);
  }
  if (sn !== 0) throw new Error("the proof is shorter than the tree is deep");
  return root;
}

/**
 * RFC 9162 §2.1.4.2: whether `proof` shows the tree of `first` leaves with root
 * `firstRoot` is a prefix of the tree of `second` leaves with root `secondRoot`.
 */
export async function consistent(first, second, firstRoot, secondRoot, proof) {
  if (first > second) return false;
  if (first === second) return proof.length === 0 && equal(firstRoot, secondRoot);
  if (first === 0) return proof.length === 0;
  if (proof.length === 0) return false;
  let path = proof;
  // A first tree of a power-of-two size is a whole subtree of the second: its root starts the path.
  if (Number.isInteger(Math.log2(first))) path = [firstRoot, ...proof];
  let fn = first - 1;
  let sn = second - 1;
  while (odd(fn)) {
    fn = half(fn);
    sn = half(sn);
  }
  let fr = path[0];
  let sr = path[0];
  for (const node of path.slice(1)) {
    if (sn === 0) return false;
    if (odd(fn) || fn === sn) {
      fr = await nodeHash(node, fr);
      sr = await nodeHash(node, sr);
      if (!odd(fn)) {
        while (!odd(fn) && fn !== 0) {
          fn = half(fn);
          sn = half(sn);
        }
      }
    } else {
      sr = await nodeHash(sr, node);
    }
    fn = half(fn);
    sn = half(sn);
  }
  return sn === 0 && equal(fr, firstRoot) && equal(sr, secondRoot);
}

/** A C2SP verifier key, `name+hexid+base64(0x01 ‖ Ed25519 public key)`. */
export function parseVerifierKey(vkey) {
  // The key's base64 may itself hold '+': only the first two separate fields.
  const [name, id] = vkey.split("+", 2);
  const key = vkey.slice((name || "").length + (id || "").length + 2);
  if (!name || !/^[0-9a-f]{8}$/.test(id || "") || !key) {
    throw new Error("not a signed-note verifier key");
  }
  const bytes = fromBase64(key);
  if (bytes.length !== 33 || bytes[0] !== 1) throw new Error("not an Ed25519 verifier key");
  return { name, id, publicKey: bytes.slice(1), vkey };
}

/**
 * A C2SP tlog-checkpoint: its origin, size and root, the signed text, and its signature
 * lines (the log's and any witnesses' cosignatures).
 */
export function parseCheckpoint(note) {
  const split = note.indexOf("\n\n");
  if (split < 0) throw new Error("the checkpoint has no signatures");
  const text = note.slice(0, split + 1);
  const [origin, sizeText, rootText] = text.split("\n");
  const size = Number(sizeText);
  if (!origin || !/^\d+$/.test(sizeText || "") || !Number.isSafeInteger(size)) {
    throw new Error("the checkpoint's size is malformed");
  }
  const root = fromBase64(rootText || "");
  if (root.length !== 32) throw new Error("the checkpoint's root is malformed");
  const signatures = note
    .slice(split + 2)
    .split("\n")
    .filter((line) => line.startsWith("\u2014 "))
    .map((line) => {
      const [, name, signature] = line.split(" ");
      const bytes = fromBase64(signature || "");
      return { name, id: toHex(bytes.slice(0, 4)), signature: bytes.slice(4) };
    });
  return { origin, size, root, text, signatures };
}

/** Whether `checkpoint` carries a valid Ed25519 signature by `key` (from parseVerifierKey). */
export async function signedBy(checkpoint, key) {
  const line = checkpoint.signatures.find((s) => s.name === key.name && s.id === key.id);
  if (!line || line.signature.length !== 64) return false;
  const publicKey = await crypto.subtle.importKey("raw", key.publicKey, { name: "Ed25519" }, false, [
    "verify",
  ]);
  return crypto.subtle.verify({ name: "Ed25519" }, publicKey, line.signature, encoder.encode(checkpoint.text));
}

/**
 * Checks one ledger entry: `leaf` (its hash, from its bytes or as served), its inclusion
 * `proof` at `index` in the tree of `treeSize`, and the signed `note` of that tree under
 * `key`. Returns `{ verified: true }` or `{ verified: false, why }`.
 */
export async function verifyEntry({ leaf, index, treeSize, proof, note, key }) {
  try {
    const checkpoint = parseCheckpoint(note);
    if (checkpoint.size !== treeSize) {
      return { verified: false, why: `the proof is for a tree of ${treeSize}, the checkpoint for ${checkpoint.size}` };
    }
    const root = await rootFromInclusion(index, treeSize, leaf, proof);
    if (!equal(root, checkpoint.root)) {
      return { verified: false, why: "the inclusion proof does not lead to the checkpoint's root" };
    }
    if (!(await signedBy(checkpoint, key))) {
      return { verified: false, why: `the checkpoint is not signed by the pinned ledger key ${key.id}` };
    }
    return { verified: true, checkpoint };
  } catch (error) {
    return { verified: false, why: error.message };
  }
}
