-- Which sequenced ledger entries touched which patient's compartment: the index behind a
-- patient's AuditEvent view. Patient ids are the opaque ids the entries already name.
CREATE TABLE ledger_patient_entries (
    patient    TEXT   NOT NULL,
    leaf_index BIGINT NOT NULL,
    PRIMARY KEY (patient, leaf_index)
);
-- How many sequenced entries (from index 0) the table above covers; the sequencer
-- catches up from here, so entries sequenced before this migration are indexed too.
ALTER TABLE ledger_state ADD COLUMN patient_index_size BIGINT NOT NULL DEFAULT 0;
