-- Presence digests go back to search_hashes, one row per 16-byte digest.
INSERT OR IGNORE INTO search_hashes (hash, resource_seq)
WITH RECURSIVE part(seq, rest, hash) AS (
    SELECT seq, presence, NULL FROM resources WHERE length(presence) > 0
    UNION ALL
    SELECT seq, substr(rest, 17), substr(rest, 1, 16) FROM part WHERE length(rest) > 0
)
SELECT hash, seq FROM part WHERE hash IS NOT NULL;
ALTER TABLE resources DROP COLUMN presence;
