//! Connections to Postgres.

use std::time::Duration;

use std::sync::Arc;

use futures::StreamExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use secrecy::ExposeSecret;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::PostgresConfig;

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

/// The connection settings of `postgres.url`; `application_name` is the
/// URL's (or `outbox-relay`), with `-{role}` appended when given, so a
/// session's purpose shows in `pg_stat_activity`.
fn settings(config: &PostgresConfig, role: Option<&str>) -> Result<tokio_postgres::Config, DatabaseError> {
    let mut pg: tokio_postgres::Config =
        config.url.expose_secret().parse().map_err(|e: tokio_postgres::Error| DatabaseError::Url(e.to_string()))?;
    pg.connect_timeout(Duration::from_millis(config.connect_timeout_ms));
    let base = pg.get_application_name().unwrap_or("outbox-relay").to_string();
    match role {
        Some(role) => pg.application_name(format!("{base}-{role}")),
        None => pg.application_name(base),
    };
    Ok(pg)
}

/// Opens a regular (non-replication) connection and drives it in a task.
pub async fn connect(config: &PostgresConfig) -> Result<Client, DatabaseError> {
    connect_as(config, None).await
}

/// [`connect`], with `-{role}` appended to the session's `application_name`.
pub async fn connect_as(config: &PostgresConfig, role: Option<&str>) -> Result<Client, DatabaseError> {
    let (client, connection) = settings(config, role)?.connect(tls(config)?).await.map_err(DatabaseError::Connect)?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "postgres connection closed");
        }
    });
    Ok(client)
}

/// Opens a regular connection (named as by [`connect_as`]) that listens on
/// `channel`. The receiver yields once per wake-up (notifications coalesce)
/// and ends when the connection closes.
pub async fn listen(
    config: &PostgresConfig,
    role: Option<&str>,
    channel: &str,
) -> Result<(Client, mpsc::Receiver<()>), DatabaseError> {
    let pg = settings(config, role)?;
    let (client, mut connection) = pg.connect(tls(config)?).await.map_err(DatabaseError::Connect)?;
    let (tx, rx) = mpsc::channel(1);
    let name = channel.to_string();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                // Full means a wake-up is pending already.
                Ok(AsyncMessage::Notification(_)) => {
                    let _ = tx.try_send(());
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(error = %err, channel = %name, "LISTEN connection failed");
                    break;
                }
            }
        }
    });
    client.batch_execute(&format!("LISTEN \"{}\"", channel.replace('"', "\"\""))).await?;
    Ok((client, rx))
}
