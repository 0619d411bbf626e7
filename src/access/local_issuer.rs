//! The local token issuer of the embedded default and the tests: an Ed25519 key in the data
//! directory that `fhirledger token` signs JWTs with and the server trusts unless
//! `FHIRLEDGER_LOCAL_ISSUER=false`. Production deployments turn it off and trust their
//! identity provider instead: whoever can read the data directory can mint any token.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::crypto::KeyError;
use crate::crypto::keys::{load_or_create_secret_file, read_secret_file};

/// The key's file in the data directory.
pub const LOCAL_ISSUER_KEY_FILE: &str = "local-issuer.key";
/// How the local issuer's identifier ends (`{base URL}/local-issuer`): a token whose issuer
/// ends so but is not trusted was most likely minted with another data directory or address.
pub const LOCAL_ISSUER_PATH: &str = "/local-issuer";
/// Longest lifetime of a locally issued token.
pub const MAX_TTL_SECONDS: u64 = 30 * 24 * 3600;

/// What a locally issued token says.
#[derive(Debug, Clone, Default)]
pub struct TokenRequest {
    pub subject: String,
    pub scope: String,
    pub client_id: Option<String>,
    pub patient: Option<String>,
    pub fhir_user: Option<String>,
    pub purpose_of_use: Option<String>,
    pub ttl_seconds: u64,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    iat: u64,
    exp: u64,
    jti: String,
    scope: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patient: Option<&'a str>,
    #[serde(rename = "fhirUser", skip_serializing_if = "Option::is_none")]
    fhir_user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    purpose_of_use: Option<&'a str>,
}

/// The local issuer: its identifier is `{base URL}/local-issuer`, its tokens' audience the
/// base URL.
pub struct LocalIssuer {
    signing: SigningKey,
    encoding: EncodingKey,
    issuer: String,
    audience: String,
    kid: String,
}

impl std::fmt::Debug for LocalIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalIssuer")
            .field("issuer", &self.issuer)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl LocalIssuer {
    /// Loads the key from the data directory, creating it (mode 0600) on first use.
    /// Returns whether it was generated.
    pub fn load_or_create(data_dir: &Path, base_url: &str) -> Result<(Self, bool), KeyError> {
        let (seed, generated) =
            load_or_create_secret_file(&data_dir.join(LOCAL_ISSUER_KEY_FILE), "local issuer key")?;
        Ok((Self::from_seed(&seed, base_url)?, generated))
    }

    /// Loads the key the server created in the data directory, or `None` when there is none.
    /// `fhirledger token` uses this and never creates a key: a key it made would be one the
    /// server does not trust, and its tokens would all be refused.
    pub fn load_existing(data_dir: &Path, base_url: &str) -> Result<Option<Self>, KeyError> {
        let path = data_dir.join(LOCAL_ISSUER_KEY_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let seed = read_secret_file(&path, "local issuer key")?;
        Ok(Some(Self::from_seed(&seed, base_url)?))
    }

    /// The issuer of `base_url` with the key from a 32-byte seed.
    pub fn from_seed(seed: &[u8; 32], base_url: &str) -> Result<Self, KeyError> {
        let signing = SigningKey::from_bytes(seed);
        let der = signing.to_pkcs8_der().map_err(|e| KeyError::Malformed {
            source_name: "local issuer key",
            detail: e.to_string(),
        })?;
        let public = signing.verifying_key().to_bytes();
        let thumb = Sha256::digest(public);
        let kid = format!(
            "local-{}",
            thumb[..6]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        Ok(Self {
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            signing,
            issuer: format!("{base_url}{LOCAL_ISSUER_PATH}"),
            audience: base_url.to_owned(),
            kid,
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The issuer's public key as a JWKS (also served at `/.well-known/jwks.json`).
    pub fn jwks(&self) -> JwkSet {
        let x = URL_SAFE_NO_PAD.encode(self.signing.verifying_key().to_bytes());
        let value = serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "x": x, "use": "sig", "alg": "EdDSA", "kid": self.kid,
        }]});
        // A fixed shape of known-good fields: it always deserializes.
        serde_json::from_value(value).unwrap_or(JwkSet { keys: Vec::new() })
    }

    /// Signs a token for `request`.
    pub fn mint(&self, request: &TokenRequest) -> Result<String, String> {
        if request.subject.is_empty() {
            return Err("a token needs a subject".into());
        }
        if request.ttl_seconds == 0 || request.ttl_seconds > MAX_TTL_SECONDS {
            return Err(format!(
                "the lifetime must be from 1 to {MAX_TTL_SECONDS} seconds"
            ));
        }
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            iss: &self.issuer,
            aud: &self.audience,
            sub: &request.subject,
            iat: now,
            exp: now + request.ttl_seconds,
            jti: uuid::Uuid::new_v4().to_string(),
            scope: &request.scope,
            client_id: request.client_id.as_deref(),
            patient: request.patient.as_deref(),
            fhir_user: request.fhir_user.as_deref(),
            purpose_of_use: request.purpose_of_use.as_deref(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding).map_err(|e| e.to_string())
    }
}
