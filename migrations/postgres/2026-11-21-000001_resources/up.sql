-- One row per logical resource: its current version and whether that version is a deletion.
CREATE TABLE resources (
    resource_type   TEXT    NOT NULL,
    id              TEXT    NOT NULL,
    current_version BIGINT  NOT NULL,
    deleted         BOOLEAN NOT NULL,
    last_updated    BIGINT  NOT NULL, -- microseconds since the Unix epoch, UTC
    PRIMARY KEY (resource_type, id)
);

-- Every version ever written. Content is AES-256-GCM ciphertext under a wrapped data key;
-- a deletion is a version without content.
CREATE TABLE resource_versions (
    resource_type TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    version_id    BIGINT  NOT NULL,
    last_updated  BIGINT  NOT NULL,
    deleted       BOOLEAN NOT NULL,
    method        TEXT    NOT NULL, -- the HTTP method that wrote it: POST, PUT or DELETE
    key_id        TEXT,
    wrapped_key   BYTEA,
    nonce         BYTEA,
    ciphertext    BYTEA,
    PRIMARY KEY (resource_type, id, version_id),
    CHECK (deleted OR (key_id IS NOT NULL AND wrapped_key IS NOT NULL AND nonce IS NOT NULL AND ciphertext IS NOT NULL))
);
