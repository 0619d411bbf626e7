-- Ledger entries: appended as pending (leaf_index NULL) by requests, then given their leaf
-- index by the single sequencer. `data` is the exact leaf bytes (JCS, signed).
CREATE TABLE ledger_entries (
    pending_seq  INTEGER PRIMARY KEY AUTOINCREMENT,
    receipt      TEXT   NOT NULL UNIQUE,
    leaf_index   BIGINT UNIQUE,
    leaf_hash    BLOB,   -- RFC 6962 leaf hash, set when sequenced (for proof by leaf hash)
    data         BLOB   NOT NULL,
    created_at   BIGINT NOT NULL, -- µs since the epoch, when the entry became durable
    sequenced_at BIGINT
);
CREATE INDEX ledger_entries_leaf_hash ON ledger_entries (leaf_hash);
CREATE INDEX ledger_entries_pending ON ledger_entries (pending_seq) WHERE leaf_index IS NULL;

-- Merkle tree node hashes in tlog "stored hash" order.
CREATE TABLE ledger_hashes (
    stored_index BIGINT PRIMARY KEY,
    hash         BLOB   NOT NULL
);

-- Every signed checkpoint (C2SP signed note).
CREATE TABLE ledger_checkpoints (
    tree_size  BIGINT PRIMARY KEY,
    root_hash  BLOB   NOT NULL,
    note       TEXT   NOT NULL,
    created_at BIGINT NOT NULL
);

-- The sequencer's state: the size of the sequenced tree. One row.
CREATE TABLE ledger_state (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    tree_size BIGINT  NOT NULL
);
INSERT INTO ledger_state (id, tree_size) VALUES (1, 0);
