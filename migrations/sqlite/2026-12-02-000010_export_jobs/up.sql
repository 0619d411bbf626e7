-- Bulk export jobs ($export), kept in the database so a job survives a restart and any
-- server process sharing the database can answer its status. What could name a patient
-- (the kick-off request with its _typeFilter searches, the token's identity the job runs
-- as) is sealed like a resource; the rest is counts, types and times.
CREATE TABLE export_jobs (
    id               TEXT   PRIMARY KEY,
    -- SHA-256 (hex) of the issuer, subject and client of the token that started the job:
    -- only that token's bearer may poll, download or cancel.
    owner            TEXT   NOT NULL,
    key_id           TEXT   NOT NULL,
    wrapped_key      BLOB  NOT NULL,
    nonce            BLOB  NOT NULL,
    sealed_job       BLOB  NOT NULL,
    status           TEXT   NOT NULL, -- queued, running, complete, failed
    transaction_time BIGINT NOT NULL,
    created_at       BIGINT NOT NULL,
    -- A running job's runner renews this while it works; a job whose lease ran out (its
    -- process stopped) is started again from the beginning by whichever process claims it.
    lease_until      BIGINT NOT NULL DEFAULT 0,
    resources_done   BIGINT NOT NULL DEFAULT 0,
    error            TEXT,
    -- When a finished job and its files are deleted.
    expires_at       BIGINT
);
CREATE INDEX export_jobs_by_status ON export_jobs (status, created_at);

-- The output files of export jobs, each sealed: one page of resources of one type.
CREATE TABLE export_files (
    job_id         TEXT    NOT NULL,
    file_no        INTEGER NOT NULL,
    resource_type  TEXT    NOT NULL,
    resource_count BIGINT  NOT NULL,
    key_id         TEXT    NOT NULL,
    wrapped_key    BLOB   NOT NULL,
    nonce          BLOB   NOT NULL,
    ciphertext     BLOB   NOT NULL,
    PRIMARY KEY (job_id, file_no)
);
