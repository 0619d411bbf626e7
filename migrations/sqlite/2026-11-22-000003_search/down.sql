DROP INDEX resource_versions_last_updated;
DROP TABLE search_numbers;
DROP TABLE search_dates;
DROP TABLE search_hashes;
CREATE TABLE resources_without_seq (
    resource_type   TEXT    NOT NULL,
    id              TEXT    NOT NULL,
    current_version BIGINT  NOT NULL,
    deleted         BOOLEAN NOT NULL,
    last_updated    BIGINT  NOT NULL,
    PRIMARY KEY (resource_type, id)
);
INSERT INTO resources_without_seq SELECT resource_type, id, current_version, deleted, last_updated FROM resources;
DROP TABLE resources;
ALTER TABLE resources_without_seq RENAME TO resources;
