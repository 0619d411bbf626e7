DROP TABLE search_numbers;
DROP TABLE search_dates;
DROP TABLE search_hashes;
ALTER TABLE resources DROP COLUMN seq;
