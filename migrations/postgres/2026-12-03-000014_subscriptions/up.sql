-- FHIR Subscriptions (rest-hook): one row per Subscription resource the server delivers for.
-- The resource itself (criteria, endpoint, headers) is stored encrypted like any other; this
-- row holds what matching needs in clear (the searched type and, for accesses to a record,
-- the patient's opaque id) and, sealed, the identity of the token that created it, which
-- every notification is checked against as a search by that token would be.
CREATE TABLE subscriptions (
    id            TEXT   PRIMARY KEY,
    -- 'access': AuditEvent?patient=… (accesses to a record, matched as the ledger sequences
    -- them); 'resource': any other type, matched when a resource of it is written.
    kind          TEXT   NOT NULL,
    resource_type TEXT   NOT NULL,
    patient       TEXT,
    status        TEXT   NOT NULL, -- active, error, off
    key_id        TEXT   NOT NULL,
    wrapped_key   BYTEA  NOT NULL,
    nonce         BYTEA  NOT NULL,
    sealed        BYTEA  NOT NULL,
    failures      INTEGER NOT NULL DEFAULT 0,
    created_at    BIGINT NOT NULL
);
CREATE INDEX subscriptions_by_type ON subscriptions (resource_type, kind, status);
CREATE INDEX subscriptions_by_patient ON subscriptions (patient, kind, status);

-- What is to be delivered: one row per subscription and event, durable, so that a restart
-- delivers what was pending and retries what failed. 'focus' is the reference the
-- notification names (Type/id/_history/v, or AuditEvent/<leaf index> for an access).
CREATE TABLE subscription_events (
    seq             BIGSERIAL PRIMARY KEY,
    subscription_id TEXT   NOT NULL,
    focus           TEXT   NOT NULL,
    created_at      BIGINT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    -- pending, delivered, skipped (the subscriber may not see it, or it did not match),
    -- dropped (the subscription was switched off or failed)
    state           TEXT   NOT NULL DEFAULT 'pending',
    done_at         BIGINT
);
CREATE INDEX subscription_events_due ON subscription_events (state, next_attempt_at);
