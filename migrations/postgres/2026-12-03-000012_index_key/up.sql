-- Which index key the blind index was built with (its id, never the key): a server started
-- with another key would find nothing, so it refuses to start instead. NULL until the first
-- server after this migration records its own. While `fhirledger keys rotate-index` rebuilds
-- the index for a new key, `rekey_to` names that key and `rekeyed_through` how far (by
-- resources.seq) the rebuild has got, so that a stopped rebuild continues where it was.
ALTER TABLE search_state ADD COLUMN index_key TEXT;
ALTER TABLE search_state ADD COLUMN rekey_to TEXT;
ALTER TABLE search_state ADD COLUMN rekeyed_through BIGINT NOT NULL DEFAULT 0;
