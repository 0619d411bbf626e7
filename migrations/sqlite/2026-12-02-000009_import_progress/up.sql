-- How far `fhirledger import` has loaded each source file, named by the SHA-256 of its
-- content (not its path, which may be renamed or say something about a patient). Each batch
-- of lines records its last line in the transaction that writes it, so an interrupted
-- import resumes after the last batch that committed and never writes a line twice.
CREATE TABLE import_progress (
    source     TEXT   PRIMARY KEY,
    lines_done BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
