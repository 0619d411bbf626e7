ALTER TABLE search_state DROP COLUMN rekeyed_through;
ALTER TABLE search_state DROP COLUMN rekey_to;
ALTER TABLE search_state DROP COLUMN index_key;
