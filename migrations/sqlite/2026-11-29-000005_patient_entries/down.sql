ALTER TABLE ledger_state DROP COLUMN patient_index_size;
DROP TABLE ledger_patient_entries;
