DROP TABLE resource_versions;
DROP TABLE resources;
