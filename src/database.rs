//! Connections to Postgres and the single-active-relay lock.

use std::time::Duration;

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use secrecy::ExposeSecret;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{Config, PostgresConfig};

/// Why Postgres could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    /// The source says why (refused, authentication, timeout).
    #[error("cannot connect to Postgres")]
    Connect(#[source] tokio_postgres::Error),
    #[error("Postgres query failed")]
    Query(#[from] tokio_postgres::Error),
    #[error("invalid postgres.url: {0}")]
    Url(String),
    #[error("postgres.tls_ca_file: {0}")]
    Tls(String),
}

/// The TLS set-up of every regular Postgres connection, with libpq's
/// semantics: whether TLS is used follows the URL's `sslmode` (`prefer` by
/// default: TLS when the server offers it, `require`: TLS or nothing). With
/// `postgres.tls_ca_file` the server's certificate is verified against that
/// CA and the host name, as libpq's `verify-full`; without it the connection
/// is encrypted but, as with libpq's `prefer` and `require`, the certificate
/// is not verified.
pub fn tls(config: &PostgresConfig) -> Result<MakeRustlsConnect, DatabaseError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| DatabaseError::Tls(e.to_string()))?;
    let client = match &config.tls_ca_file {
        Some(path) => {
            let bad = |e: &dyn std::fmt::Display| DatabaseError::Tls(format!("{}: {e}", path.display()));
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
                roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(EncryptOnly(provider))).with_no_client_auth()
        }
    };
    Ok(MakeRustlsConnect::new(client))
}

/// Accepts the server's certificate without checking who signed it (the
/// handshake's signatures are still verified), as libpq does for
/// `sslmode=prefer|require`; set `postgres.tls_ca_file` to verify.
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Opens a regular (non-replication) connection and drives it in a task.
pub async fn connect(config: &PostgresConfig) -> Result<Client, DatabaseError> {
    let mut pg: tokio_postgres::Config =
        config.url.expose_secret().parse().map_err(|e: tokio_postgres::Error| DatabaseError::Url(e.to_string()))?;
    pg.connect_timeout(Duration::from_millis(config.connect_timeout_ms));
    if pg.get_application_name().is_none() {
        pg.application_name("outbox-relay");
    }
    let (client, connection) = pg.connect(tls(config)?).await.map_err(DatabaseError::Connect)?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "postgres connection closed");
        }
    });
    Ok(client)
}

/// Key of the advisory lock that elects the active relay among sidecars
/// sharing one outbox: derived from the table and slot, so relays of
/// different outboxes in one database do not exclude each other.
pub fn leader_lock_key(config: &Config) -> i64 {
    // FNV-1a: stable across versions and platforms, unlike std's hasher.
    let text = format!("outbox-relay:{}:{}", config.outbox_table_sql(), config.source.slot_name);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// Tries to become the active relay. The lock lives as long as `client`'s
/// session: a crashed relay's lock is released when Postgres notices the
/// connection is gone, and a standby takes over.
pub async fn try_lead(client: &Client, key: i64) -> Result<bool, DatabaseError> {
    let row = client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]).await?;
    Ok(row.try_get(0)?)
}
