-- Composite parameters whose last component is a date, number or quantity
-- (search.html#composite): their rows carry the blind-index digest of the leading
-- components' value from the same node (HMAC like search_hashes, no plaintext), so a
-- search matches both in one row. NULL on the rows of plain parameters.
ALTER TABLE search_dates ADD COLUMN lead BYTEA;
ALTER TABLE search_numbers ADD COLUMN lead BYTEA;
-- Still probed per candidate by (resource_seq, param); the digest is checked in the index.
DROP INDEX search_dates_resource;
CREATE INDEX search_dates_resource ON search_dates (resource_seq, param, lead);
DROP INDEX search_numbers_resource;
CREATE INDEX search_numbers_resource ON search_numbers (resource_seq, param, lead);
