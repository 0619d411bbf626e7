-- Presence digests go back to search_hashes, one row per 16-byte digest.
INSERT INTO search_hashes (hash, resource_seq)
SELECT substring(r.presence FROM i * 16 + 1 FOR 16), r.seq
FROM resources r, generate_series(0, length(r.presence) / 16 - 1) AS i
WHERE length(r.presence) > 0
ON CONFLICT DO NOTHING;
ALTER TABLE resources DROP COLUMN presence;
