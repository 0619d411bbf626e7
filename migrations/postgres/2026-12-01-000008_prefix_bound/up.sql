-- How far the string prefixes in the search index reach. Indexes written before this table
-- existed hold prefixes of at most 12 characters; the server rebuilds them in the background
-- (recording how far it has got, by resources.seq) and searches look up longer prefixes only
-- once every resource has them. A new database starts at the full bound (24).
CREATE TABLE search_state (
    id                INTEGER PRIMARY KEY CHECK (id = 1),
    prefix_chars      INTEGER NOT NULL,
    reindexed_through BIGINT  NOT NULL DEFAULT 0
);
INSERT INTO search_state (id, prefix_chars)
    SELECT 1, CASE WHEN EXISTS (SELECT 1 FROM resources) THEN 12 ELSE 24 END;
