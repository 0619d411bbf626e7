DROP INDEX search_numbers_resource;
DROP INDEX search_dates_resource;
ALTER TABLE search_numbers DROP COLUMN lead;
ALTER TABLE search_dates DROP COLUMN lead;
CREATE INDEX search_dates_resource ON search_dates (resource_seq, param);
CREATE INDEX search_numbers_resource ON search_numbers (resource_seq, param);
