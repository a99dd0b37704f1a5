//! The Confluent-compatible schema registry: subjects, ids, compatibility.
//!
//! Registration and the compatibility verdict go through
//! `schema_registry_converter` (`post_schema`, `is_compatible_schema`), and
//! its `AvroDecoder` decodes for readers ([`crate::codec::decode`]). The
//! other calls are plain HTTP on the same API, because the crate (6.x) does
//! not give what they need:
//! - setting a subject's compatibility level (`PUT /config/{subject}`): it
//!   has no such call;
//! - looking up a schema's id under a subject without registering it
//!   (`POST /subjects/{subject}`, [`Registry::lookup`]) and asking whether a
//!   subject exists (`GET /subjects/{subject}/versions`,
//!   [`Registry::has_subject`]): it can send both (`perform_sr_call`,
//!   `get_all_versions`), but its `SRCError` keeps the HTTP status only in
//!   its message text and marks only 502 and 503 retriable, so "not
//!   registered" (404) could not be told from a refusal, nor another 5xx
//!   from a refusal, without parsing that text;
//! - the registry's reasons for an incompatibility (`?verbose=true`):
//!   `is_compatible_schema` returns a bare `bool`.
//!
//! Every client starts from [`client_builder`], so `registry.tls_ca_file`
//! applies to every call.

use std::sync::Arc;
use std::time::Duration;

use schema_registry_converter::async_impl::schema_registry::{is_compatible_schema, post_schema, SrSettings};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};
use secrecy::ExposeSecret;

use crate::config::{RegistryConfig, SubjectStrategy};
use crate::error_class::{text_cause, Cause, ErrorClass, Leaf};
use crate::telemetry::{metrics, ErrorChain};

/// Why a registry call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// The registry could not be reached or answered with a server error:
    /// retry with backoff.
    #[error("schema registry unreachable")]
    Unreachable(#[source] Cause),
    /// The schema is not registered under the subject (and auto-registration is off).
    #[error("schema {file} is not registered under subject `{subject}`: run `relay schemas register`")]
    NotRegistered { subject: String, file: String },
    /// The registry refused the request (incompatible, invalid schema).
    #[error("schema registry refused {what}: {reason}")]
    Refused { what: String, reason: String },
    /// `registry.tls_ca_file` cannot be used (validated at start, so only
    /// if it changed since).
    #[error("registry.tls_ca_file: {file}")]
    CaFile {
        file: String,
        #[source]
        source: Cause,
    },
    /// The registry's TLS certificate was rejected (unknown CA, wrong host
    /// name, expired): an operator must fix the configuration or the
    /// certificate; retrying cannot help.
    #[error("the schema registry's TLS certificate is not accepted ({reason}); {fix}")]
    Certificate { reason: String, fix: &'static str },
}

impl RegistryError {
    /// A CA file or certificate the relay cannot use needs an operator;
    /// the rest may clear by itself (an outage, a schema registered later).
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Unreachable(_) | Self::NotRegistered { .. } | Self::Refused { .. } => ErrorClass::Retry,
            Self::CaFile { .. } => ErrorClass::operator("correct registry.tls_ca_file"),
            Self::Certificate { .. } => ErrorClass::operator("correct the registry's TLS trust"),
        }
    }

    /// Whether only an operator can cure this (a retry cannot).
    pub fn needs_operator(&self) -> bool {
        matches!(self.class(), ErrorClass::Operator(_))
    }

    /// The error of a failed HTTP call, only borrowed (the chain's text is
    /// kept): [`RegistryError::Certificate`] when the TLS handshake
    /// rejected the registry's certificate, decided by the typed rustls
    /// error in the source chain; else unreachable.
    pub fn from_http(err: &(dyn std::error::Error + 'static)) -> Self {
        Self::certificate(err).unwrap_or_else(|| Self::Unreachable(text_cause(ErrorChain(err).to_string())))
    }

    /// [`Self::from_http`] for an error the caller owns, kept as the source.
    fn http(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::certificate(&err).unwrap_or_else(|| Self::Unreachable(Arc::new(err)))
    }

    fn certificate(err: &(dyn std::error::Error + 'static)) -> Option<Self> {
        let cert = certificate_error(err)?;
        Some(Self::Certificate { reason: format!("invalid peer certificate: {cert}"), fix: certificate_fix(cert) })
    }

    /// The error of a failed `schema_registry_converter` call, which keeps
    /// the HTTP error as its source (its own text already names the cause).
    fn from_converter(err: &SRCError) -> Self {
        Self::certificate(err).unwrap_or_else(|| Self::Unreachable(Arc::new(Leaf(err.clone()))))
    }
}

/// The rustls certificate error somewhere in `err`'s source chain. TLS
/// streams report handshake failures as an `io::Error` wrapping the rustls
/// error (reqwest wraps that in another `io::Error`), and `io::Error::source`
/// skips the error it wraps, so an `io::Error` is opened with `get_ref`.
fn certificate_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::CertificateError> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(rustls::Error::InvalidCertificate(cert)) = e.downcast_ref::<rustls::Error>() {
            return Some(cert);
        }
        next = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

/// What to do about a rejected certificate.
fn certificate_fix(err: &rustls::CertificateError) -> &'static str {
    use rustls::CertificateError as E;
    match err {
        E::NotValidForName | E::NotValidForNameContext { .. } => {
            "registry.url must use a host name the certificate holds (its subjectAltName)"
        }
        E::Expired | E::ExpiredContext { .. } | E::NotValidYet | E::NotValidYetContext { .. } => {
            "the registry's certificate is outside its validity period: renew it (or check the clock)"
        }
        _ => "set registry.tls_ca_file to the PEM file of the CA that signs the registry's certificate",
    }
}

/// A client builder for the registry with the configured trust: only the
/// CAs of `registry.tls_ca_file` when set (as `postgres.tls_ca_file`), else
/// the system's roots. Every HTTP client of the registry starts from here.
pub fn client_builder(config: &RegistryConfig) -> Result<reqwest::ClientBuilder, RegistryError> {
    let builder = reqwest::Client::builder();
    let Some(path) = &config.tls_ca_file else { return Ok(builder) };
    let unusable = |source: Cause| RegistryError::CaFile { file: path.display().to_string(), source };
    let certs = crate::tls::ca_certificates(path).map_err(|e| unusable(Arc::new(e)))?;
    let roots = certs
        .iter()
        .map(|der| reqwest::Certificate::from_der(der))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unusable(Arc::new(e)))?;
    Ok(builder.tls_certs_only(roots))
}

/// The subject a schema is registered under, by strategy.
pub fn subject_name(strategy: SubjectStrategy, topic: &str, record_full_name: &str) -> String {
    match strategy {
        SubjectStrategy::Topic => format!("{topic}-value"),
        SubjectStrategy::Record => record_full_name.to_string(),
        SubjectStrategy::TopicRecord => format!("{topic}-{record_full_name}"),
    }
}

/// A client of one registry.
#[derive(Clone)]
pub struct Registry {
    base: String,
    settings: SrSettings,
    http: reqwest::Client,
    auth: Option<(String, Option<String>)>,
}

/// The settings of `schema_registry_converter`'s clients for `config`: URL,
/// timeout, basic authentication and TLS trust (`registry.tls_ca_file`).
pub fn sr_settings(config: &RegistryConfig) -> Result<SrSettings, RegistryError> {
    let mut builder = SrSettings::new_builder(config.url.trim_end_matches('/').to_string());
    builder.set_timeout(Duration::from_secs(10));
    if let Some(user) = &config.username {
        let password = config.password.as_ref().map(|p| p.expose_secret().to_string());
        builder.set_basic_authorization(user, password.as_deref());
    }
    builder.build_with(client_builder(config)?).map_err(|e| RegistryError::Unreachable(Arc::new(Leaf(e))))
}

impl Registry {
    pub fn new(config: &RegistryConfig) -> Result<Self, RegistryError> {
        let base = config.url.trim_end_matches('/').to_string();
        let auth = config
            .username
            .as_ref()
            .map(|u| (u.clone(), config.password.as_ref().map(|p| p.expose_secret().to_string())));
        let settings = sr_settings(config)?;
        let http = client_builder(config)?.timeout(Duration::from_secs(10)).build().map_err(RegistryError::http)?;
        Ok(Self { base, settings, http, auth })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("content-type", "application/vnd.schemaregistry.v1+json");
        if let Some((user, password)) = &self.auth {
            request = request.basic_auth(user, password.as_deref());
        }
        request
    }

    /// Registers `schema` under `subject` (idempotent) and returns its id.
    pub async fn register(&self, subject: &str, schema: &str, full_name: &str) -> Result<u32, RegistryError> {
        let supplied = SuppliedSchema::new(Some(full_name.to_string()), SchemaType::Avro, schema.to_string());
        post_schema(&self.settings, subject.to_string(), supplied).await.map(|r| r.id).map_err(|e| {
            metrics::registry_error();
            match RegistryError::from_converter(&e) {
                RegistryError::Unreachable(_) if !e.retriable => {
                    RegistryError::Refused { what: format!("registering under `{subject}`"), reason: e.to_string() }
                }
                err => err,
            }
        })
    }

    /// The id of `schema` under `subject`, without registering it.
    pub async fn lookup(&self, subject: &str, schema: &str, file: &str) -> Result<u32, RegistryError> {
        let body = serde_json::json!({ "schema": schema, "schemaType": "AVRO" });
        let response =
            self.request(reqwest::Method::POST, &format!("/subjects/{subject}")).json(&body).send().await.map_err(
                |e| {
                    metrics::registry_error();
                    RegistryError::http(e)
                },
            )?;
        let status = response.status();
        if status.as_u16() == 404 {
            return Err(RegistryError::NotRegistered { subject: subject.to_string(), file: file.to_string() });
        }
        if status.is_server_error() {
            metrics::registry_error();
            return Err(RegistryError::Unreachable(text_cause(format!("{subject}: HTTP {status}"))));
        }
        let value: serde_json::Value = response.json().await.map_err(RegistryError::http)?;
        value["id"].as_u64().map(|id| id as u32).ok_or_else(|| RegistryError::Refused {
            what: format!("looking up `{subject}`"),
            reason: format!("HTTP {status}: {value}"),
        })
    }

    /// Sets the subject's compatibility level.
    pub async fn set_compatibility(&self, subject: &str, level: &str) -> Result<(), RegistryError> {
        let response = self
            .request(reqwest::Method::PUT, &format!("/config/{subject}"))
            .json(&serde_json::json!({ "compatibility": level }))
            .send()
            .await
            .map_err(RegistryError::http)?;
        if response.status().is_success() {
            Ok(())
        } else {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            Err(RegistryError::Refused {
                what: format!("compatibility {level} for `{subject}`"),
                reason: format!("HTTP {status}: {text}"),
            })
        }
    }

    /// Whether the subject exists at all.
    pub async fn has_subject(&self, subject: &str) -> Result<bool, RegistryError> {
        let response = self
            .request(reqwest::Method::GET, &format!("/subjects/{subject}/versions"))
            .send()
            .await
            .map_err(RegistryError::http)?;
        Ok(response.status().is_success())
    }

    /// Checks `schema` against the subject's compatibility rule. `Ok(None)`
    /// when compatible, `Ok(Some(reason))` when not.
    pub async fn check(&self, subject: &str, schema: &str, full_name: &str) -> Result<Option<String>, RegistryError> {
        let supplied = SuppliedSchema::new(Some(full_name.to_string()), SchemaType::Avro, schema.to_string());
        let compatible = is_compatible_schema(&self.settings, subject.to_string(), supplied)
            .await
            .map_err(|e| RegistryError::from_converter(&e))?;
        if compatible {
            return Ok(None);
        }
        // Ask for the registry's own explanation.
        let body = serde_json::json!({ "schema": schema, "schemaType": "AVRO" });
        let reason = match self
            .request(reqwest::Method::POST, &format!("/compatibility/subjects/{subject}/versions/latest?verbose=true"))
            .json(&body)
            .send()
            .await
        {
            Ok(response) => {
                let value: serde_json::Value = response.json().await.unwrap_or_default();
                match value.get("messages").and_then(|m| m.as_array()) {
                    Some(messages) if !messages.is_empty() => messages
                        .iter()
                        .map(|m| m.as_str().map(str::to_string).unwrap_or_else(|| m.to_string()))
                        .collect::<Vec<_>>()
                        .join("; "),
                    _ => "incompatible with the latest registered version".to_string(),
                }
            }
            Err(_) => "incompatible with the latest registered version".to_string(),
        };
        Ok(Some(reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape reqwest reports a rejected certificate in: an `io::Error`
    /// around the TLS stream's `io::Error` around the rustls error.
    fn handshake_error(cert: rustls::CertificateError) -> std::io::Error {
        let tls = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::InvalidCertificate(cert));
        std::io::Error::other(tls)
    }

    #[test]
    fn a_rejected_certificate_is_told_from_an_outage() {
        let unknown = RegistryError::from_http(&handshake_error(rustls::CertificateError::UnknownIssuer));
        assert!(unknown.needs_operator() && unknown.to_string().contains("registry.tls_ca_file"), "{unknown}");
        let name = RegistryError::from_http(&handshake_error(rustls::CertificateError::NotValidForName));
        assert!(name.to_string().contains("registry.url must use a host name"), "{name}");
        let refused = RegistryError::from_http(&std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(refused, RegistryError::Unreachable(_)) && !refused.needs_operator(), "{refused}");
    }

    #[test]
    fn subject_names_by_strategy() {
        let name = "dev.outboxrelay.example.OrderPlaced";
        assert_eq!(subject_name(SubjectStrategy::Topic, "outbox.order", name), "outbox.order-value");
        assert_eq!(subject_name(SubjectStrategy::Record, "outbox.order", name), name);
        assert_eq!(
            subject_name(SubjectStrategy::TopicRecord, "outbox.order", name),
            "outbox.order-dev.outboxrelay.example.OrderPlaced"
        );
    }
}
