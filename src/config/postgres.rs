//! `[postgres]`: where the outbox lives.

use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{defaults, invalid, ConfigError};

/// Where the outbox lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/database`; a secret, never logged.
    pub url: SecretString,
    /// Timeout for establishing a connection, in milliseconds.
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// PEM file of the CA(s) that sign the server's certificate. When set,
    /// TLS connections verify the certificate and host name against it (as
    /// libpq's `verify-full`); when not, TLS (`sslmode=prefer`, the default,
    /// or `require` in the URL) encrypts without verifying, as libpq does.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
}

impl PostgresConfig {
    /// `postgres.url` parses (the CA file is read by [`crate::preflight`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.url.expose_secret().parse::<tokio_postgres::Config>().is_err() {
            return invalid("postgres.url", "expected a URL such as postgres://user:password@127.0.0.1:5432/db");
        }
        Ok(())
    }
}
