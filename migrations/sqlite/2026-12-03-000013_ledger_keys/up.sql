-- The chain of ledger signing keys (public verifier keys only). The first row is the key the
-- log started with (first_index 0), recorded by the first server after this migration; each
-- later row is a rotation: the incoming key signs every entry from first_index on, and the
-- outgoing key announced it in the entry at announced_at, included in the checkpoint it
-- signed (announcement) whose size is first_index.
CREATE TABLE ledger_keys (
    first_index  BIGINT PRIMARY KEY,
    vkey         TEXT   NOT NULL UNIQUE,
    announced_at BIGINT,
    announcement TEXT,
    added_at     BIGINT NOT NULL
);
