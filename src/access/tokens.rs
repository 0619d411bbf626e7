//! Bearer token verification: JWTs signed by a trusted issuer with an asymmetric key it
//! publishes (RS256, ES256 or EdDSA), meant for this server (`aud`), inside their validity
//! window (`exp`, `nbf`, with [`LEEWAY_SECONDS`] of clock skew). Symmetric algorithms are
//! refused outright, so a public key can never be used as an HMAC secret, and `alg: none`
//! is not a signature. Verified tokens are cached by their SHA-256 until they expire, so a
//! client sending the same token pays for one signature check.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::Mutex;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::local_issuer::{LOCAL_ISSUER_PATH, LocalIssuer};
use super::principal::TokenIdentity;
use super::scopes::Scopes;

/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECONDS: u64 = 60;
/// Most verified tokens kept; a full cache drops the expired ones, then everything.
const CACHE_LIMIT: usize = 10_000;
/// The signature algorithms accepted.
const ACCEPTED: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

/// Why a request was not authenticated. The messages go to the client (in the
/// OperationOutcome and `WWW-Authenticate`); none repeats a claim of the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("this endpoint needs an 'Authorization: Bearer <token>' header")]
    Missing,
    #[error("the Authorization header is not 'Bearer <token>'")]
    NotBearer,
    #[error("the bearer token is not a well-formed JWT")]
    Malformed,
    #[error("tokens signed with '{0}' are not accepted (RS256, ES256 and EdDSA are)")]
    Algorithm(String),
    #[error("the token's issuer is not trusted by this server")]
    UnknownIssuer,
    #[error("the token names a signing key its issuer does not publish")]
    UnknownKey,
    /// A token of a local issuer (`…/local-issuer`, as `fhirledger token` mints them) that
    /// is not this server's: minted with another data directory's key (`unknown-key`) or
    /// for another address (`unknown-issuer`). The usual cause is running `fhirledger token`
    /// from another directory, so the message says where the key must come from.
    #[error(
        "the token comes from a local issuer that is not this server's: mint it with \
         fhirledger token using the server's own data directory (the directory the server was \
         started in, or the FHIRLEDGER_DATA_DIR or --data-dir it was given) and its \
         FHIRLEDGER_LISTEN or FHIRLEDGER_BASE_URL"
    )]
    ForeignLocalIssuer { reason: &'static str },
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token is not meant for this server (aud)")]
    WrongAudience,
    #[error("the token lacks the required claim '{0}'")]
    MissingClaim(&'static str),
}

impl AuthError {
    /// The reason recorded in the ledger's deny entry.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "no-token",
            Self::NotBearer | Self::Malformed => "malformed-token",
            Self::Algorithm(_) => "algorithm-refused",
            Self::UnknownIssuer => "unknown-issuer",
            Self::UnknownKey => "unknown-key",
            Self::ForeignLocalIssuer { reason } => reason,
            Self::BadSignature => "bad-signature",
            Self::Expired => "token-expired",
            Self::NotYetValid => "token-not-yet-valid",
            Self::WrongAudience => "wrong-audience",
            Self::MissingClaim(_) => "missing-claim",
        }
    }
}

/// One published verification key.
struct IssuerKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// The claims this server reads. Required ones are optional here so that their absence is
/// reported as such rather than as a malformed token.
#[derive(Debug, Deserialize)]
struct Claims {
    iss: String,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default, rename = "fhirUser")]
    fhir_user: Option<String>,
    #[serde(default)]
    patient: Option<String>,
    #[serde(default)]
    purpose_of_use: Option<String>,
}

/// Checks bearer tokens against the trusted issuers.
pub struct TokenVerifier {
    issuers: HashMap<String, Vec<IssuerKey>>,
    /// Whether a local issuer is trusted: only then does a refused token that looks like
    /// one get the hint about the data directory.
    trusts_local_issuer: bool,
    audiences: Vec<String>,
    cache: Mutex<HashMap<[u8; 32], Arc<TokenIdentity>>>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("issuers", &self.issuers.keys().collect::<Vec<_>>())
            .field("audiences", &self.audiences)
            .finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// A verifier accepting tokens whose `aud` is one of `audiences`, from no issuer yet.
    pub fn new(audiences: Vec<String>) -> Self {
        Self {
            issuers: HashMap::new(),
            trusts_local_issuer: false,
            audiences,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Trusts the local issuer's key (see [`super::local_issuer`]).
    pub fn trust_local(&mut self, local: &LocalIssuer) -> Result<(), String> {
        self.trust(local.issuer(), &local.jwks())?;
        self.trusts_local_issuer = true;
        Ok(())
    }

    /// Trusts `issuer`'s signing keys from its JWKS. Keys for encryption, symmetric keys and
    /// curves other than P-256 and Ed25519 are refused.
    pub fn trust(&mut self, issuer: &str, jwks: &JwkSet) -> Result<(), String> {
        let mut keys = Vec::new();
        for jwk in &jwks.keys {
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
                (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
                (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
                    if ec.curve == EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                (AlgorithmParameters::OctetKeyPair(okp), None | Some(KeyAlgorithm::EdDSA))
                    if okp.curve == EllipticCurve::Ed25519 =>
                {
                    Algorithm::EdDSA
                }
                (AlgorithmParameters::OctetKey(_), _) => {
                    return Err(format!(
                        "issuer {issuer}: symmetric (oct) keys are not accepted"
                    ));
                }
                _ => {
                    return Err(format!(
                        "issuer {issuer}: key {} is not an RS256, ES256 (P-256) or EdDSA (Ed25519) key",
                        jwk.common.key_id.as_deref().unwrap_or("without kid")
                    ));
                }
            };
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|e| format!("issuer {issuer}: unreadable key: {e}"))?;
            keys.push(IssuerKey {
                kid: jwk.common.key_id.clone(),
                algorithm,
                key,
            });
        }
        if keys.is_empty() {
            return Err(format!("issuer {issuer}: the JWKS has no signing key"));
        }
        self.issuers.insert(issuer.to_owned(), keys);
        Ok(())
    }

    /// Verifies `token` and returns what it says about its bearer.
    pub fn verify(&self, token: &str) -> Result<Arc<TokenIdentity>, AuthError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(identity) = self.cache.lock().get(&digest)
            && identity.expires_at + LEEWAY_SECONDS > now
        {
            return Ok(identity.clone());
        }
        let identity = Arc::new(self.verify_uncached(token)?);
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_LIMIT {
            cache.retain(|_, cached| cached.expires_at + LEEWAY_SECONDS > now);
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
        }
        cache.insert(digest, identity.clone());
        Ok(identity)
    }

    fn verify_uncached(&self, token: &str) -> Result<TokenIdentity, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| refused_header(token))?;
        if !ACCEPTED.contains(&header.alg) {
            return Err(AuthError::Algorithm(format!("{:?}", header.alg)));
        }
        // The issuer picks the keys; nothing else of the claims is read before the
        // signature is checked.
        #[derive(Deserialize)]
        struct Unverified {
            iss: Option<String>,
        }
        let unverified: Unverified = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|_| AuthError::Malformed)?;
        let issuer = unverified.iss.ok_or(AuthError::MissingClaim("iss"))?;
        // Says only that the issuer looks local, never what it or the key id is.
        let looks_local = self.trusts_local_issuer && issuer.ends_with(LOCAL_ISSUER_PATH);
        let refused = |error: AuthError| match error {
            AuthError::UnknownIssuer | AuthError::UnknownKey if looks_local => {
                AuthError::ForeignLocalIssuer {
                    reason: error.reason(),
                }
            }
            other => other,
        };
        let keys = self
            .issuers
            .get(&issuer)
            .ok_or_else(|| refused(AuthError::UnknownIssuer))?;
        let mut candidates = keys.iter().filter(|k| k.algorithm == header.alg);
        let key = match &header.kid {
            Some(kid) => candidates.find(|k| k.kid.as_deref() == Some(kid.as_str())),
            // Without a kid the key must be unambiguous.
            None => match (candidates.next(), candidates.next()) {
                (Some(only), None) => Some(only),
                _ => None,
            },
        }
        .ok_or_else(|| refused(AuthError::UnknownKey))?;

        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.set_issuer(&[issuer.as_str()]);
        validation.set_audience(&self.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidAudience => AuthError::WrongAudience,
                ErrorKind::InvalidIssuer => AuthError::UnknownIssuer,
                ErrorKind::MissingRequiredClaim(claim) => {
                    AuthError::MissingClaim(match claim.as_str() {
                        "exp" => "exp",
                        "aud" => "aud",
                        "iss" => "iss",
                        _ => "sub",
                    })
                }
                _ => AuthError::Malformed,
            })?
            .claims;
        Ok(TokenIdentity {
            issuer: claims.iss,
            subject: claims
                .sub
                .filter(|sub| !sub.is_empty())
                .ok_or(AuthError::MissingClaim("sub"))?,
            client_id: claims.client_id,
            scopes: Scopes::parse(claims.scope.as_deref().unwrap_or("")),
            fhir_user: claims.fhir_user,
            patient: claims.patient,
            purpose_of_use: claims.purpose_of_use,
            expires_at: claims.exp.ok_or(AuthError::MissingClaim("exp"))?,
        })
    }
}

/// Why a header did not parse: an algorithm this server refuses (`none`, or one the JWT
/// library does not know), named with at most 16 plain characters, or malformed.
fn refused_header(token: &str) -> AuthError {
    let alg = token
        .split('.')
        .next()
        .and_then(|part| URL_SAFE_NO_PAD.decode(part).ok())
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|header| header.get("alg")?.as_str().map(str::to_owned));
    match alg {
        Some(alg) => AuthError::Algorithm(
            alg.chars()
                .filter(char::is_ascii_alphanumeric)
                .take(16)
                .collect(),
        ),
        None => AuthError::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::local_issuer::{LocalIssuer, TokenRequest};

    fn issuer() -> LocalIssuer {
        LocalIssuer::from_seed(&[7; 32], "https://fhir.test").unwrap()
    }

    fn request(scope: &str) -> TokenRequest {
        TokenRequest {
            subject: "s".into(),
            scope: scope.into(),
            ttl_seconds: 60,
            ..TokenRequest::default()
        }
    }

    #[test]
    fn verified_tokens_are_cached_until_they_expire() {
        let local = issuer();
        let mut verifier = TokenVerifier::new(vec!["https://fhir.test".into()]);
        verifier.trust(local.issuer(), &local.jwks()).unwrap();
        let token = local.mint(&request("system/*.rs")).unwrap();
        let first = verifier.verify(&token).unwrap();
        let second = verifier.verify(&token).unwrap();
        assert!(
            Arc::ptr_eq(&first, &second),
            "the second check is served from the cache"
        );
        assert_eq!(first.subject, "s");
        // A cached entry whose token has expired is not served.
        verifier.cache.lock().insert(
            Sha256::digest(b"stale").into(),
            Arc::new(TokenIdentity {
                expires_at: 1,
                ..(*first).clone()
            }),
        );
        assert_eq!(verifier.verify("stale"), Err(AuthError::Malformed));
    }

    #[test]
    fn symmetric_and_unknown_keys_are_not_trusted() {
        let mut verifier = TokenVerifier::new(vec!["https://fhir.test".into()]);
        let oct: JwkSet =
            serde_json::from_value(serde_json::json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
                .unwrap();
        assert!(
            verifier
                .trust("https://idp.test", &oct)
                .unwrap_err()
                .contains("symmetric")
        );
        let empty = JwkSet { keys: Vec::new() };
        assert!(verifier.trust("https://idp.test", &empty).is_err());
        // A token from an issuer never trusted.
        let token = issuer().mint(&request("system/*.rs")).unwrap();
        assert_eq!(verifier.verify(&token), Err(AuthError::UnknownIssuer));
    }

    #[test]
    fn a_local_token_of_another_data_directory_or_address_is_told_where_keys_come_from() {
        let server = issuer();
        let mut verifier = TokenVerifier::new(vec!["https://fhir.test".into()]);
        verifier.trust_local(&server).unwrap();
        // Another data directory: the same issuer name, another key.
        let elsewhere = LocalIssuer::from_seed(&[8; 32], "https://fhir.test").unwrap();
        let token = elsewhere.mint(&request("system/*.rs")).unwrap();
        let error = verifier.verify(&token).unwrap_err();
        assert_eq!(
            error,
            AuthError::ForeignLocalIssuer {
                reason: "unknown-key"
            }
        );
        assert!(error.to_string().contains("FHIRLEDGER_DATA_DIR"), "{error}");
        // Another address: an issuer name this server does not have.
        let other_address = LocalIssuer::from_seed(&[7; 32], "https://other.test").unwrap();
        let token = other_address.mint(&request("system/*.rs")).unwrap();
        assert_eq!(
            verifier.verify(&token).unwrap_err().reason(),
            "unknown-issuer"
        );
        // Without a trusted local issuer there is no hint.
        let plain = TokenVerifier::new(vec!["https://fhir.test".into()]);
        assert_eq!(plain.verify(&token), Err(AuthError::UnknownIssuer));
    }
}
