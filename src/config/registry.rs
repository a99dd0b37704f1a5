//! `[registry]`: the schema registry of the Avro codec.

use std::path::PathBuf;

use secrecy::SecretString;
use serde::Deserialize;

/// The Confluent-compatible schema registry (used by the Avro codec). Its
/// keys are checked with the codec's (`codec.format = "avro"` needs a URL)
/// and its CA file by [`crate::preflight`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL of the Confluent API, e.g. `http://127.0.0.1:58081/apis/ccompat/v7`.
    /// Empty when no registry is used (`codec.format = "json"`).
    #[serde(default)]
    pub url: String,
    /// Basic-auth user, if the registry requires one.
    #[serde(default)]
    pub username: Option<String>,
    /// Basic-auth password; a secret, never logged.
    #[serde(default)]
    pub password: Option<SecretString>,
    /// PEM file of the CA(s) that sign an `https://` registry's certificate.
    /// When set, only these CAs are trusted (as `postgres.tls_ca_file`: the
    /// file pins trust, the system's roots no longer count); when not, the
    /// system's roots are. The certificate and host name are verified
    /// either way.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
}
