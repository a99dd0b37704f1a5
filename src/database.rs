//! Connections to Postgres.

use std::time::Duration;

use std::sync::Arc;

use futures::StreamExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use secrecy::ExposeSecret;
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::PostgresConfig;
use crate::error_class::ErrorClass;

/// Why Postgres could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    /// The source says why (refused, authentication, timeout).
    #[error("cannot connect to Postgres")]
    Connect(#[source] tokio_postgres::Error),
    #[error("Postgres query failed")]
    Query(#[from] tokio_postgres::Error),
    #[error("invalid postgres.url")]
    Url(#[source] tokio_postgres::Error),
    /// TLS cannot be set up: `what` names the CA file that cannot be used.
    #[error("postgres.tls_ca_file: {what}")]
    Tls {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl DatabaseError {
    /// A wrong URL or CA file needs an operator; a connection or query is
    /// judged by the SQLSTATE the server sent ([`sql_state_class`]).
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Connect(e) | Self::Query(e) => class_of(e),
            Self::Url(_) | Self::Tls { .. } => ErrorClass::operator("correct postgres.url / postgres.tls_ca_file"),
        }
    }
}

/// The class of a Postgres error: by its SQLSTATE ([`sql_state_class`]).
pub fn class_of(err: &tokio_postgres::Error) -> ErrorClass {
    sql_state_class(err.code())
}

/// The class of a SQLSTATE: the codes that name a fix (authentication,
/// privilege, missing table, column or database) stop the relay with it;
/// any other code, or none (connection lost), is retried.
pub fn sql_state_class(code: Option<&SqlState>) -> ErrorClass {
    let Some(code) = code else { return ErrorClass::Retry };
    let fix = if *code == SqlState::INVALID_PASSWORD || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
        "check the user and password in postgres.url, and pg_hba.conf"
    } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        "grant the relay's role what it needs: `relay check` names each missing privilege, `relay migrate --print-grants ROLE` prints the GRANTs (README, Security)"
    } else if *code == SqlState::UNDEFINED_TABLE {
        "a table the relay needs does not exist: run `relay migrate` as the outbox table's owner"
    } else if *code == SqlState::UNDEFINED_COLUMN {
        "a configured column does not exist: run `relay migrate` or correct outbox.columns"
    } else if *code == SqlState::INVALID_CATALOG_NAME {
        "the database in postgres.url does not exist"
    } else {
        return ErrorClass::Retry;
    };
    ErrorClass::operator(fix)
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
        .map_err(|e| DatabaseError::Tls { what: "the TLS defaults".into(), source: Box::new(e) })?;
    let client = match &config.tls_ca_file {
        Some(path) => {
            let bad = |e: Box<dyn std::error::Error + Send + Sync>| DatabaseError::Tls {
                what: path.display().to_string(),
                source: e,
            };
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(Box::new(e)))? {
                roots.add(cert.map_err(|e| bad(Box::new(e)))?).map_err(|e| bad(Box::new(e)))?;
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
    let mut pg: tokio_postgres::Config = config.url.expose_secret().parse().map_err(DatabaseError::Url)?;
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
