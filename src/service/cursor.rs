//! The one paging cursor of searches, `$everything`, type and system history and the
//! patient's AuditEvent view: a position serialized and sealed with the master key
//! (AES-GCM, the envelope every resource is sealed with) into a URL-safe token for `_cursor`.
//! A position may hold a sort value taken from resource content, such as a family name, or
//! a resource's id, which must not travel in URLs in clear; sealing also makes cursors
//! tamper-proof, and each kind is bound to its own name, so that one kind's cursor is refused
//! by another's pages.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crypto::{EncryptedBlob, Envelope, ResourceBinding};
use crate::error::AppError;

/// Which pages a cursor belongs to; its name is sealed with it (a binding no resource version
/// can have).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CursorKind {
    /// Searches and `$everything` (a keyset position in storage or sort order).
    Search,
    /// Type and system history (the last version shown).
    History,
    /// The patient's AuditEvent view (the leaf index to continue below).
    AuditView,
}

impl CursorKind {
    fn binding(self) -> ResourceBinding<'static> {
        let name = match self {
            Self::Search => "search-cursor",
            Self::History => "history-cursor",
            Self::AuditView => "audit-view-cursor",
        };
        ResourceBinding {
            resource_type: name,
            id: "-",
            version_id: 0,
        }
    }
}

/// Seals `position` into a cursor of `kind`.
pub(crate) fn seal<T: Serialize>(envelope: &Envelope, kind: CursorKind, position: &T) -> String {
    let plaintext = serde_json::to_vec(position).unwrap_or_default();
    let blob = envelope.seal(kind.binding(), &plaintext);
    let mut bytes = Vec::new();
    for part in [
        blob.key_id.as_bytes(),
        &blob.wrapped_key,
        &blob.nonce,
        &blob.ciphertext,
    ] {
        bytes.extend_from_slice(&u32::try_from(part.len()).unwrap_or(0).to_be_bytes());
        bytes.extend_from_slice(part);
    }
    BASE64URL.encode(bytes)
}

/// Opens a cursor of `kind` from a link; anything this server did not seal as that kind
/// (edited, truncated, another kind's, another server's) is refused with 400.
pub(crate) fn open<T: DeserializeOwned>(
    envelope: &Envelope,
    kind: CursorKind,
    text: &str,
) -> Result<T, AppError> {
    let bytes = BASE64URL.decode(text).map_err(|_| not_ours())?;
    let mut parts = Vec::with_capacity(4);
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        let (length, tail) = rest.split_at_checked(4).ok_or_else(not_ours)?;
        let length = u32::from_be_bytes(length.try_into().map_err(|_| not_ours())?) as usize;
        let (part, tail) = tail.split_at_checked(length).ok_or_else(not_ours)?;
        parts.push(part.to_vec());
        rest = tail;
    }
    let [key_id, wrapped_key, nonce, ciphertext]: [Vec<u8>; 4] =
        parts.try_into().map_err(|_| not_ours())?;
    let blob = EncryptedBlob {
        key_id: String::from_utf8(key_id).map_err(|_| not_ours())?,
        wrapped_key,
        nonce,
        ciphertext,
    };
    let plaintext = envelope
        .open(kind.binding(), &blob)
        .map_err(|_| not_ours())?;
    serde_json::from_slice(&plaintext).map_err(|_| not_ours())
}

/// The refusal of a cursor that is not one of this page's links.
pub(crate) fn not_ours() -> AppError {
    AppError::BadRequest {
        message: "_cursor is not a cursor from this page's links".into(),
        expression: Some("_cursor".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    fn envelope() -> Envelope {
        Envelope::new(MasterKey::from_bytes([7; 32]))
    }

    #[test]
    fn a_cursor_opens_as_its_own_kind_only() {
        let envelope = envelope();
        let text = seal(&envelope, CursorKind::History, &(42_i64, "Patient"));
        assert!(!text.contains("Patient"), "the position travels sealed");
        let position: (i64, String) = open(&envelope, CursorKind::History, &text).unwrap();
        assert_eq!(position, (42, "Patient".to_owned()));
        assert!(open::<(i64, String)>(&envelope, CursorKind::Search, &text).is_err());
        assert!(open::<(i64, String)>(&envelope, CursorKind::AuditView, &text).is_err());
        let mut edited = text.clone().into_bytes();
        let last = edited.len() - 2;
        edited[last] = if edited[last] == b'A' { b'B' } else { b'A' };
        let edited = String::from_utf8(edited).unwrap();
        assert!(open::<(i64, String)>(&envelope, CursorKind::History, &edited).is_err());
        assert!(open::<(i64, String)>(&envelope, CursorKind::History, "not base64!").is_err());
    }
}
