//! The deployment's SMART authorization server as this server publishes it: the trusted
//! identity provider's issuer, endpoints, capabilities and grant types (SMART App Launch
//! 2.x, conformance.html), as configured. Nothing here is fetched: the server verifies the
//! tokens that provider issues, and publishes only what the operator vouched for.

use crate::fhir::capability::OAuthEndpoints;

/// Capabilities of the identity provider, not of this server (SMART App Launch 2.x,
/// conformance.html#capabilities). The server's own (`permission-v1`, `permission-v2`,
/// `permission-patient`, `permission-user`) are always published and are not configured.
pub const PROVIDER_CAPABILITIES: &[&str] = &[
    "launch-ehr",
    "launch-standalone",
    "authorize-post",
    "client-public",
    "client-confidential-symmetric",
    "client-confidential-asymmetric",
    "sso-openid-connect",
    "context-banner",
    "context-style",
    "context-ehr-patient",
    "context-ehr-encounter",
    "context-standalone-patient",
    "context-standalone-encounter",
    "permission-offline",
    "permission-online",
];

/// Grant types a SMART token endpoint may offer: `authorization_code` for App Launch,
/// `client_credentials` for Backend Services (conformance.html, `grant_types_supported`).
pub const GRANT_TYPES: &[&str] = &["authorization_code", "client_credentials"];

/// What the identity provider offers SMART clients, checked to be coherent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmartAuthorization {
    /// One of the trusted issuers: tokens it issues are the ones this server accepts.
    pub issuer: String,
    pub jwks_uri: Option<String>,
    /// Absent for a provider that serves Backend Services only (no user, no browser).
    pub authorization_endpoint: Option<String>,
    pub token_endpoint: String,
    pub introspection_endpoint: Option<String>,
    pub revocation_endpoint: Option<String>,
    pub registration_endpoint: Option<String>,
    pub management_endpoint: Option<String>,
    /// Members of [`PROVIDER_CAPABILITIES`].
    pub capabilities: Vec<String>,
    /// Members of [`GRANT_TYPES`], never empty.
    pub grant_types: Vec<String>,
    /// The portal's client id at the provider, for its standalone launch.
    pub portal_client_id: Option<String>,
}

impl SmartAuthorization {
    /// The endpoints the CapabilityStatement names.
    pub fn oauth_endpoints(&self) -> OAuthEndpoints<'_> {
        OAuthEndpoints {
            authorize: self.authorization_endpoint.as_deref(),
            token: &self.token_endpoint,
            register: self.registration_endpoint.as_deref(),
            manage: self.management_endpoint.as_deref(),
            introspect: self.introspection_endpoint.as_deref(),
            revoke: self.revocation_endpoint.as_deref(),
        }
    }

    /// Checks what would make the published document false: unknown capabilities or grant
    /// types, launch capabilities without an authorization endpoint, OpenID Connect without
    /// a key set. Returns the setting at fault and why.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        for capability in &self.capabilities {
            if !PROVIDER_CAPABILITIES.contains(&capability.as_str()) {
                return Err((
                    "FHIRLEDGER_SMART_CAPABILITIES",
                    format!(
                        "'{capability}' is not a capability of the identity provider; one of: {}",
                        PROVIDER_CAPABILITIES.join(", ")
                    ),
                ));
            }
            // Launches, launch context, public clients and OpenID Connect sign-in all go
            // through the authorization endpoint (app-launch.html).
            let needs_browser = capability.starts_with("launch-")
                || capability.starts_with("context-")
                || matches!(
                    capability.as_str(),
                    "authorize-post" | "client-public" | "sso-openid-connect"
                );
            if needs_browser && self.authorization_endpoint.is_none() {
                return Err((
                    "FHIRLEDGER_SMART_CAPABILITIES",
                    format!("'{capability}' needs FHIRLEDGER_SMART_AUTHORIZATION_ENDPOINT"),
                ));
            }
        }
        // The portal's launch goes through the authorization endpoint, with the code grant.
        if self.portal_client_id.is_some()
            && (self.authorization_endpoint.is_none()
                || !self.grant_types.iter().any(|g| g == "authorization_code"))
        {
            return Err((
                "FHIRLEDGER_PORTAL_CLIENT_ID",
                "needs FHIRLEDGER_SMART_AUTHORIZATION_ENDPOINT and the authorization_code grant"
                    .into(),
            ));
        }
        // conformance.html: with sso-openid-connect, `issuer` and `jwks_uri` are required.
        if self.has("sso-openid-connect") && self.jwks_uri.is_none() {
            return Err((
                "FHIRLEDGER_SMART_JWKS_URI",
                "'sso-openid-connect' needs the provider's key set URL".into(),
            ));
        }
        if self.grant_types.is_empty() {
            return Err(("FHIRLEDGER_SMART_GRANT_TYPES", "is empty".into()));
        }
        for grant in &self.grant_types {
            if !GRANT_TYPES.contains(&grant.as_str()) {
                return Err((
                    "FHIRLEDGER_SMART_GRANT_TYPES",
                    format!("'{grant}' is not one of {}", GRANT_TYPES.join(", ")),
                ));
            }
            if grant == "authorization_code" && self.authorization_endpoint.is_none() {
                return Err((
                    "FHIRLEDGER_SMART_GRANT_TYPES",
                    "'authorization_code' needs FHIRLEDGER_SMART_AUTHORIZATION_ENDPOINT".into(),
                ));
            }
        }
        Ok(())
    }

    /// The grant types to assume when none are configured: what the endpoints given make
    /// possible (a provider without an authorization endpoint can only serve Backend
    /// Services).
    pub fn default_grant_types(has_authorization_endpoint: bool) -> Vec<String> {
        let grant = if has_authorization_endpoint {
            "authorization_code"
        } else {
            "client_credentials"
        };
        vec![grant.to_owned()]
    }

    pub fn has(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }

    /// `token_endpoint_auth_methods_supported`, from the client capabilities: symmetric
    /// clients authenticate with HTTP Basic, asymmetric ones with a signed JWT
    /// (client-confidential-symmetric.html, client-confidential-asymmetric.html).
    pub fn token_endpoint_auth_methods(&self) -> Vec<&'static str> {
        let mut methods = Vec::new();
        if self.has("client-confidential-symmetric") {
            methods.push("client_secret_basic");
        }
        if self.has("client-confidential-asymmetric") {
            methods.push("private_key_jwt");
        }
        methods
    }

    /// Scopes the provider grants that this server does not read but clients ask for:
    /// sign-in, launch context and refresh (scopes-and-launch-context.html).
    pub fn launch_scopes(&self) -> Vec<&'static str> {
        let mut scopes = Vec::new();
        if self.has("sso-openid-connect") {
            scopes.extend(["openid", "fhirUser"]);
        }
        if self.has("launch-ehr") {
            scopes.push("launch");
        }
        if self.has("context-standalone-patient") {
            scopes.push("launch/patient");
        }
        if self.has("context-standalone-encounter") {
            scopes.push("launch/encounter");
        }
        if self.has("permission-offline") {
            scopes.push("offline_access");
        }
        if self.has("permission-online") {
            scopes.push("online_access");
        }
        scopes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> SmartAuthorization {
        SmartAuthorization {
            issuer: "https://idp.example.org".into(),
            jwks_uri: None,
            authorization_endpoint: None,
            token_endpoint: "https://idp.example.org/token".into(),
            introspection_endpoint: None,
            revocation_endpoint: None,
            registration_endpoint: None,
            management_endpoint: None,
            capabilities: Vec::new(),
            grant_types: SmartAuthorization::default_grant_types(false),
            portal_client_id: None,
        }
    }

    #[test]
    fn launch_needs_an_authorization_endpoint() {
        let mut smart = provider();
        assert_eq!(smart.check(), Ok(()));
        smart.capabilities = vec!["launch-standalone".into()];
        assert_eq!(
            smart.check().map_err(|e| e.0),
            Err("FHIRLEDGER_SMART_CAPABILITIES")
        );
        smart.authorization_endpoint = Some("https://idp.example.org/auth".into());
        assert_eq!(smart.check(), Ok(()));
        smart.grant_types = vec!["authorization_code".into()];
        assert_eq!(smart.check(), Ok(()));
        smart.authorization_endpoint = None;
        smart.capabilities.clear();
        assert_eq!(
            smart.check().map_err(|e| e.0),
            Err("FHIRLEDGER_SMART_GRANT_TYPES")
        );
    }

    #[test]
    fn unknown_or_own_capabilities_are_refused() {
        let mut smart = provider();
        smart.capabilities = vec!["permission-v2".into()];
        assert!(smart.check().is_err());
        smart.capabilities = vec!["client-confidential-asymmetric".into()];
        assert_eq!(smart.check(), Ok(()));
        assert_eq!(smart.token_endpoint_auth_methods(), vec!["private_key_jwt"]);
    }

    #[test]
    fn openid_connect_needs_a_key_set() {
        let mut smart = provider();
        smart.authorization_endpoint = Some("https://idp.example.org/auth".into());
        smart.capabilities = vec!["sso-openid-connect".into()];
        assert_eq!(
            smart.check().map_err(|e| e.0),
            Err("FHIRLEDGER_SMART_JWKS_URI")
        );
        smart.jwks_uri = Some("https://idp.example.org/certs".into());
        assert_eq!(smart.check(), Ok(()));
        assert_eq!(smart.launch_scopes(), vec!["openid", "fhirUser"]);
    }
}
