DROP TABLE subscription_events;
DROP TABLE subscriptions;
