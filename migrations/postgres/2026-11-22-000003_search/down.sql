DROP INDEX resource_versions_last_updated;
DROP TABLE search_numbers;
DROP TABLE search_dates;
DROP TABLE search_hashes;
ALTER TABLE resources DROP COLUMN seq;
