CREATE TABLE ledger_hashes_wide (
    stored_index BIGINT PRIMARY KEY,
    hash         BLOB   NOT NULL
);
INSERT INTO ledger_hashes_wide (stored_index, hash)
    SELECT stored_index, hash FROM ledger_hashes ORDER BY stored_index;
DROP TABLE ledger_hashes;
ALTER TABLE ledger_hashes_wide RENAME TO ledger_hashes;

CREATE TABLE ledger_patient_entries_wide (
    patient    TEXT   NOT NULL,
    leaf_index BIGINT NOT NULL,
    PRIMARY KEY (patient, leaf_index)
);
INSERT INTO ledger_patient_entries_wide (patient, leaf_index)
    SELECT patient, leaf_index FROM ledger_patient_entries ORDER BY patient, leaf_index;
DROP TABLE ledger_patient_entries;
ALTER TABLE ledger_patient_entries_wide RENAME TO ledger_patient_entries;
