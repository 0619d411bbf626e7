-- Subscription.end: when the server turns a subscription off. Kept in clear (a time, no PHI)
-- so that the notifier finds the subscriptions whose end has passed without opening each.
ALTER TABLE subscriptions ADD COLUMN ends_at BIGINT;
CREATE INDEX subscriptions_by_end ON subscriptions (ends_at);
