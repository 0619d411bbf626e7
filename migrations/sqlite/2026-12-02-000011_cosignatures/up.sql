-- Witnesses' cosignatures of checkpoints (C2SP tlog-cosignature signature lines), collected
-- by `serve` from FHIRLEDGER_WITNESSES; `witness_time` is the witness's own clock (POSIX
-- seconds) carried in the cosignature, `received_at` the server's (microseconds).
CREATE TABLE ledger_cosignatures (
    tree_size    BIGINT NOT NULL REFERENCES ledger_checkpoints (tree_size),
    witness      TEXT   NOT NULL,
    signature    TEXT   NOT NULL,
    witness_time BIGINT NOT NULL,
    received_at  BIGINT NOT NULL,
    PRIMARY KEY (tree_size, witness)
);
