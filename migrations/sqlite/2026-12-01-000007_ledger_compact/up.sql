-- Two ledger tables stored once instead of twice. `ledger_hashes` keyed by a BIGINT
-- PRIMARY KEY kept its rows in rowid order and a second B-tree for the key; as INTEGER
-- PRIMARY KEY the key is the rowid. `ledger_patient_entries` is all key, so WITHOUT ROWID
-- keeps it in its primary key's B-tree alone. Together about 70 of the 1,000 bytes each
-- ledgered read added.
CREATE TABLE ledger_hashes_compact (
    stored_index INTEGER PRIMARY KEY,
    hash         BLOB    NOT NULL
);
INSERT INTO ledger_hashes_compact (stored_index, hash)
    SELECT stored_index, hash FROM ledger_hashes ORDER BY stored_index;
DROP TABLE ledger_hashes;
ALTER TABLE ledger_hashes_compact RENAME TO ledger_hashes;

CREATE TABLE ledger_patient_entries_compact (
    patient    TEXT   NOT NULL,
    leaf_index BIGINT NOT NULL,
    PRIMARY KEY (patient, leaf_index)
) WITHOUT ROWID;
INSERT INTO ledger_patient_entries_compact (patient, leaf_index)
    SELECT patient, leaf_index FROM ledger_patient_entries ORDER BY patient, leaf_index;
DROP TABLE ledger_patient_entries;
ALTER TABLE ledger_patient_entries_compact RENAME TO ledger_patient_entries;
