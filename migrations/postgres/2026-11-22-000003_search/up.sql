-- A stable number per logical resource: search results are ordered and paged by it, so
-- a cursor stays valid while resources are added or changed; index rows refer to it.
ALTER TABLE resources ADD COLUMN seq BIGSERIAL NOT NULL;
CREATE UNIQUE INDEX resources_seq ON resources (seq);
CREATE INDEX resources_type_seq ON resources (resource_type, seq);

-- Blind index of string, token, reference and uri values of current versions:
-- HMAC-SHA-256 (index key) of type, parameter, kind and normalized value. No plaintext.
CREATE TABLE search_hashes (
    hash         BYTEA  NOT NULL,
    resource_seq BIGINT NOT NULL,
    PRIMARY KEY (hash, resource_seq)
);
CREATE INDEX search_hashes_resource ON search_hashes (resource_seq);

-- Date values as the range they cover at their precision (µs since the epoch, UTC,
-- [low, high)). In clear, as the README's threat model says.
CREATE TABLE search_dates (
    resource_seq  BIGINT NOT NULL,
    resource_type TEXT   NOT NULL,
    param         TEXT   NOT NULL,
    low           BIGINT NOT NULL,
    high          BIGINT NOT NULL
);
-- Searched per candidate resource (EXISTS … WHERE resource_seq = r.seq AND param = …).
CREATE INDEX search_dates_resource ON search_dates (resource_seq, param);

-- Number and quantity values in clear; the unit only as blind-index digests.
CREATE TABLE search_numbers (
    resource_seq     BIGINT           NOT NULL,
    resource_type    TEXT             NOT NULL,
    param            TEXT             NOT NULL,
    value            DOUBLE PRECISION NOT NULL,
    unit_system_code BYTEA,
    unit_code        BYTEA
);
CREATE INDEX search_numbers_resource ON search_numbers (resource_seq, param);

-- Type- and system-level history read versions newest first across resources.
CREATE INDEX resource_versions_last_updated ON resource_versions (last_updated);
