//! Diesel table definitions, shared by both backends (the migrations keep them identical).

diesel::table! {
    resources (resource_type, id) {
        resource_type -> Text,
        id -> Text,
        current_version -> BigInt,
        deleted -> Bool,
        last_updated -> BigInt,
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
    ledger_checkpoints (tree_size) {
        tree_size -> BigInt,
        root_hash -> Binary,
        note -> Text,
        created_at -> BigInt,
    }
}

diesel::table! {
    ledger_state (id) {
        id -> Integer,
        tree_size -> BigInt,
    }
}

diesel::allow_tables_to_appear_in_same_query!(resources, resource_versions);
