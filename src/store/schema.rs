//! Diesel table definitions, shared by both backends (the migrations keep them identical).

diesel::table! {
    resources (resource_type, id) {
        resource_type -> Text,
        id -> Text,
        current_version -> BigInt,
        deleted -> Bool,
        last_updated -> BigInt,
        /// Stable order of creation; search results page by it.
        seq -> BigInt,
        /// Presence digests of the current version's parameters, end to end (see
        /// `store::search::IndexRows::presence`); NULL until computed for rows older than it,
        /// left as it was when a resource is deleted (searches skip deleted resources).
        presence -> Nullable<Binary>,
    }
}

diesel::table! {
    resource_versions (resource_type, id, version_id) {
        resource_type -> Text,
        id -> Text,
        version_id -> BigInt,
        last_updated -> BigInt,
        deleted -> Bool,
        method -> Text,
        key_id -> Nullable<Text>,
        wrapped_key -> Nullable<Binary>,
        nonce -> Nullable<Binary>,
        ciphertext -> Nullable<Binary>,
    }
}

diesel::table! {
    ledger_entries (pending_seq) {
        pending_seq -> BigInt,
        receipt -> Text,
        leaf_index -> Nullable<BigInt>,
        leaf_hash -> Nullable<Binary>,
        data -> Binary,
        created_at -> BigInt,
        sequenced_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    ledger_hashes (stored_index) {
        stored_index -> BigInt,
        hash -> Binary,
    }
}

diesel::table! {
    ledger_cosignatures (tree_size, witness) {
        tree_size -> BigInt,
        witness -> Text,
        signature -> Text,
        witness_time -> BigInt,
        received_at -> BigInt,
    }
}

diesel::table! {
    ledger_checkpoints (tree_size) {
        tree_size -> BigInt,
        root_hash -> Binary,
        note -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    /// The chain of ledger signing keys: the first, then each rotation.
    ledger_keys (first_index) {
        first_index -> BigInt,
        vkey -> Text,
        announced_at -> Nullable<BigInt>,
        announcement -> Nullable<Text>,
        added_at -> BigInt,
    }
}

diesel::table! {
    ledger_state (id) {
        id -> Integer,
        tree_size -> BigInt,
        patient_index_size -> BigInt,
    }
}

diesel::table! {
    ledger_patient_entries (patient, leaf_index) {
        patient -> Text,
        leaf_index -> BigInt,
    }
}

diesel::table! {
    search_hashes (hash, resource_seq) {
        hash -> Binary,
        resource_seq -> BigInt,
    }
}

diesel::table! {
    search_dates (resource_seq, param, low) {
        resource_seq -> BigInt,
        resource_type -> Text,
        param -> Text,
        low -> BigInt,
        high -> BigInt,
        lead -> Nullable<Binary>,
    }
}

diesel::table! {
    search_numbers (resource_seq, param, value) {
        resource_seq -> BigInt,
        resource_type -> Text,
        param -> Text,
        value -> Double,
        unit_system_code -> Nullable<Binary>,
        unit_code -> Nullable<Binary>,
        lead -> Nullable<Binary>,
    }
}

diesel::table! {
    /// How far the string prefixes of the search index reach, and which index key built it (one
    /// row).
    search_state (id) {
        id -> Integer,
        prefix_chars -> Integer,
        reindexed_through -> BigInt,
        index_key -> Nullable<Text>,
        rekey_to -> Nullable<Text>,
        rekeyed_through -> BigInt,
    }
}

diesel::table! {
    /// The Subscriptions the server delivers for (rest-hook).
    subscriptions (id) {
        id -> Text,
        kind -> Text,
        resource_type -> Text,
        patient -> Nullable<Text>,
        status -> Text,
        key_id -> Text,
        wrapped_key -> Binary,
        nonce -> Binary,
        sealed -> Binary,
        failures -> Integer,
        created_at -> BigInt,
        ends_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    /// Notifications to deliver, one per subscription and event.
    subscription_events (seq) {
        seq -> BigInt,
        subscription_id -> Text,
        focus -> Text,
        created_at -> BigInt,
        attempts -> Integer,
        next_attempt_at -> BigInt,
        state -> Text,
        done_at -> Nullable<BigInt>,
    }
}

diesel::allow_tables_to_appear_in_same_query!(resources, resource_versions);
diesel::allow_tables_to_appear_in_same_query!(subscriptions, subscription_events);

diesel::table! {
    /// How far `fhirledger import` has loaded each source (by the SHA-256 of its content).
    import_progress (source) {
        source -> Text,
        lines_done -> BigInt,
        updated_at -> BigInt,
    }
}

diesel::table! {
    /// Bulk export jobs; what could name a patient is in `sealed_job`.
    export_jobs (id) {
        id -> Text,
        owner -> Text,
        key_id -> Text,
        wrapped_key -> Binary,
        nonce -> Binary,
        sealed_job -> Binary,
        status -> Text,
        transaction_time -> BigInt,
        created_at -> BigInt,
        lease_until -> BigInt,
        resources_done -> BigInt,
        error -> Nullable<Text>,
        expires_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    /// The sealed output files of export jobs.
    export_files (job_id, file_no) {
        job_id -> Text,
        file_no -> Integer,
        resource_type -> Text,
        resource_count -> BigInt,
        key_id -> Text,
        wrapped_key -> Binary,
        nonce -> Binary,
        ciphertext -> Binary,
    }
}
