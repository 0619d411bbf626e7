DROP TABLE search_state;
