-- Which parameters a resource's current version has values for, as presence digests (HMAC,
-- as in search_hashes) end to end: searched only by `:missing`, tested per candidate row.
-- Rows from before this column hold NULL until the server moves their presence digests out
-- of search_hashes at start-up.
ALTER TABLE resources ADD COLUMN presence BYTEA;
