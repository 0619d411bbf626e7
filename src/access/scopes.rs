//! SMART App Launch scopes as grants: which interactions on which resource types, in which
//! context (`patient/`, `user/`, `system/`). Both the v2 form (`patient/Observation.rs`) and
//! the v1 form (`user/*.read`, `.write`, `.*`) are read. Scopes this server does not know
//! (`openid`, `launch`, `offline_access`, …) grant nothing and are ignored, as SMART asks.
//! A v2 scope narrowed by search parameters (`patient/Observation.rs?category=laboratory`)
//! is ignored too: granting it whole would grant more than it says.

use std::fmt;

/// The interaction classes SMART v2 scopes name with one letter each (`cruds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

impl Permission {
    const ALL: [Self; 5] = [
        Self::Create,
        Self::Read,
        Self::Update,
        Self::Delete,
        Self::Search,
    ];

    fn letter(self) -> char {
        match self {
            Self::Create => 'c',
            Self::Read => 'r',
            Self::Update => 'u',
            Self::Delete => 'd',
            Self::Search => 's',
        }
    }

    fn bit(self) -> u8 {
        match self {
            Self::Create => 1,
            Self::Read => 2,
            Self::Update => 4,
            Self::Delete => 8,
            Self::Search => 16,
        }
    }

    /// The word used in refusals and ledger reasons.
    pub fn verb(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Read => "read",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::Search => "search",
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.verb())
    }
}

/// Whose data a scope reaches: the launch patient's compartment, what the user may see,
/// or anything (a backend service).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum ScopeContext {
    Patient,
    User,
    System,
}

impl ScopeContext {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Patient => "patient",
            Self::User => "user",
            Self::System => "system",
        }
    }
}

/// One resource scope: a context, a type (or every type) and the permissions it grants.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct ResourceGrant {
    context: ScopeContext,
    /// `None` for `*`.
    resource_type: Option<String>,
    permissions: u8,
}

/// The scope that lets a token read the ledger API (entries, proofs, receipts), and
/// nothing else: auditors hold it without any resource scope.
pub const LEDGER_READ_SCOPE: &str = "ledger.read";

/// A token's scopes, parsed.
/// Serializable so that work done later on a token's behalf (a bulk export job) is
/// authorized as the token was.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Scopes {
    grants: Vec<ResourceGrant>,
    ledger_read: bool,
}

impl Scopes {
    /// Parses a space-separated `scope` claim; what is not a resource scope this server
    /// understands is ignored.
    pub fn parse(text: &str) -> Self {
        let mut scopes = Self::default();
        for scope in text.split_ascii_whitespace() {
            if scope == LEDGER_READ_SCOPE {
                scopes.ledger_read = true;
            } else if let Some(grant) = parse_resource_scope(scope) {
                scopes.grants.push(grant);
            }
        }
        scopes
    }

    pub fn ledger_read(&self) -> bool {
        self.ledger_read
    }

    /// The contexts in which the scopes grant `permission` on `resource_type`, widest
    /// first.
    pub fn contexts_granting(
        &self,
        permission: Permission,
        resource_type: &str,
    ) -> Vec<ScopeContext> {
        let mut contexts: Vec<ScopeContext> = self
            .grants
            .iter()
            .filter(|g| g.permissions & permission.bit() != 0)
            .filter(|g| {
                g.resource_type
                    .as_deref()
                    .is_none_or(|t| t == resource_type)
            })
            .map(|g| g.context)
            .collect();
        contexts.sort_unstable_by(|a, b| b.cmp(a));
        contexts.dedup();
        contexts
    }

    /// The widest context any resource scope has (for the ledger's actor role).
    pub fn widest_context(&self) -> Option<ScopeContext> {
        self.grants.iter().map(|g| g.context).max()
    }
}

fn parse_resource_scope(scope: &str) -> Option<ResourceGrant> {
    let (context, rest) = scope.split_once('/')?;
    let context = match context {
        "patient" => ScopeContext::Patient,
        "user" => ScopeContext::User,
        "system" => ScopeContext::System,
        _ => return None,
    };
    if rest.contains('?') {
        return None; // a scope narrowed by search parameters: see the module comment
    }
    let (resource_type, permissions) = rest.split_once('.')?;
    let resource_type = match resource_type {
        "*" => None,
        name if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphabetic()) => {
            Some(name.to_owned())
        }
        _ => return None,
    };
    let permissions = parse_permissions(permissions)?;
    Some(ResourceGrant {
        context,
        resource_type,
        permissions,
    })
}

/// `read`/`write`/`*` (SMART v1) or a non-empty subsequence of `cruds` in that order (v2).
fn parse_permissions(text: &str) -> Option<u8> {
    let bits = |list: &[Permission]| list.iter().fold(0, |acc, p| acc | p.bit());
    match text {
        "read" => return Some(bits(&[Permission::Read, Permission::Search])),
        "write" => {
            return Some(bits(&[
                Permission::Create,
                Permission::Update,
                Permission::Delete,
            ]));
        }
        "*" => return Some(bits(&Permission::ALL)),
        _ => {}
    }
    let mut remaining = Permission::ALL.iter();
    let mut granted = 0;
    for letter in text.chars() {
        // Each letter must come after the previous one in `cruds`, at most once.
        let permission = remaining.by_ref().find(|p| p.letter() == letter)?;
        granted |= permission.bit();
    }
    (granted != 0).then_some(granted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_scopes_grant_their_letters_only() {
        let scopes = Scopes::parse("patient/Observation.rs openid launch");
        assert_eq!(
            scopes.contexts_granting(Permission::Read, "Observation"),
            vec![ScopeContext::Patient]
        );
        assert!(
            scopes
                .contexts_granting(Permission::Search, "Observation")
                .len()
                == 1
        );
        assert!(
            scopes
                .contexts_granting(Permission::Create, "Observation")
                .is_empty()
        );
        assert!(
            scopes
                .contexts_granting(Permission::Read, "Patient")
                .is_empty()
        );
        assert!(!scopes.ledger_read());
    }

    #[test]
    fn v1_forms_and_wildcards() {
        let scopes = Scopes::parse("user/*.read system/Patient.write");
        assert_eq!(
            scopes.contexts_granting(Permission::Search, "Encounter"),
            vec![ScopeContext::User]
        );
        assert_eq!(
            scopes.contexts_granting(Permission::Delete, "Patient"),
            vec![ScopeContext::System]
        );
        assert_eq!(
            scopes.contexts_granting(Permission::Read, "Patient"),
            vec![ScopeContext::User]
        );
        assert!(
            scopes
                .contexts_granting(Permission::Update, "Encounter")
                .is_empty()
        );
        let all = Scopes::parse("system/*.* user/Patient.cruds");
        assert_eq!(
            all.contexts_granting(Permission::Update, "Patient"),
            vec![ScopeContext::System, ScopeContext::User]
        );
    }

    #[test]
    fn malformed_and_narrowed_scopes_grant_nothing() {
        for text in [
            "patient/Observation.sr",
            "patient/Observation.rr",
            "patient/Observation.",
            "patient/Observation.x",
            "patient/Obs-ervation.r",
            "doctor/Observation.r",
            "patient/Observation.rs?category=laboratory",
            "Observation.read",
            "patient/.r",
        ] {
            let scopes = Scopes::parse(text);
            assert_eq!(scopes, Scopes::default(), "{text}");
        }
        assert!(Scopes::parse("ledger.read").ledger_read());
    }
}
