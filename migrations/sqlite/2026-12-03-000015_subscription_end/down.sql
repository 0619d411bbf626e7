DROP INDEX subscriptions_by_end;
ALTER TABLE subscriptions DROP COLUMN ends_at;
