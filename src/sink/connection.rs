//! Connecting to the brokers: the client properties every Kafka client of
//! the relay shares, and a probe that tells refused credentials or a failed
//! TLS handshake (only an operator can fix those) from an unreachable
//! broker (a retry may cure it). `relay check` and the start of every
//! pipeline run use the same probe.

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, Producer, ProducerContext};
use rdkafka::ClientConfig;
use secrecy::ExposeSecret;

use crate::config::KafkaConfig;
use crate::error_class::ErrorClass;

/// The connection properties every client of the relay shares (producer,
/// admin client, `relay check`): the raw map, then the typed options, which
/// the raw map may not set (see `config::owned_librdkafka_key`).
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    for (key, value) in &config.librdkafka {
        client.set(key, value);
    }
    client
        .set("bootstrap.servers", &config.bootstrap_servers)
        .set("security.protocol", config.security_protocol.librdkafka_name());
    if let Some(ca) = &config.tls_ca_file {
        client.set("ssl.ca.location", ca.to_string_lossy());
    }
    if let Some(sasl) = config.sasl.as_ref().filter(|_| config.security_protocol.uses_sasl()) {
        client.set("sasl.mechanisms", sasl.mechanism.librdkafka_name()).set("sasl.username", &sasl.username);
        if let Some(password) = &sasl.password {
            client.set("sasl.password", password.expose_secret());
        }
    }
    client
}

/// Why the brokers could not be asked for metadata.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// SASL authentication was refused (wrong user, password or mechanism).
    #[error("authentication to Kafka at {servers} failed ({reason})")]
    Authentication { servers: String, reason: String },
    /// The TLS handshake failed (unknown CA, host name, protocol mismatch).
    #[error("TLS handshake with Kafka at {servers} failed ({reason})")]
    Tls { servers: String, reason: String },
    /// No broker answered in time.
    #[error("Kafka at {servers} is unreachable ({reason})")]
    Unreachable { servers: String, reason: String },
    /// librdkafka refused the client configuration.
    #[error("cannot create a Kafka client")]
    Client(#[source] KafkaError),
}

impl ConnectError {
    /// The keys to check, for the operator.
    pub fn fix(&self) -> &'static str {
        match self {
            Self::Authentication { .. } => {
                "check kafka.sasl.username, kafka.sasl.password and kafka.sasl.mechanism against the broker's SASL users"
            }
            Self::Tls { .. } => {
                "check kafka.tls_ca_file (the CA that signed the broker's certificate) and kafka.security_protocol (the listener's protocol)"
            }
            Self::Unreachable { .. } => {
                "check kafka.bootstrap_servers, kafka.security_protocol (the listener's protocol) and that the broker is running"
            }
            Self::Client(_) => "check the kafka.* settings",
        }
    }

    /// A broker that did not answer may answer later; a refusal needs an
    /// operator and [`Self::fix`].
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Unreachable { .. } => ErrorClass::Retry,
            Self::Authentication { .. } | Self::Tls { .. } | Self::Client(_) => ErrorClass::operator(self.fix()),
        }
    }

    /// Whether only an operator can cure it (a retry cannot).
    pub fn needs_operator(&self) -> bool {
        matches!(self.class(), ErrorClass::Operator(_))
    }
}

/// What the brokers answered: how many brokers and topics the principal sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reached {
    pub brokers: usize,
    /// The names of the topics it may describe.
    pub topics: Vec<String>,
}

/// Asks the brokers for metadata within `timeout` and, if that fails, says
/// why by librdkafka's error codes (never by message text).
pub async fn probe(config: &KafkaConfig, timeout: Duration) -> Result<Reached, ConnectError> {
    let servers = config.bootstrap_servers.clone();
    let client_config = client_config(config);
    let outcome = tokio::task::spawn_blocking(move || {
        let client: BaseProducer<ProbeContext> =
            client_config.create_with_context(ProbeContext::default()).map_err(ConnectError::Client)?;
        let metadata = client.client().fetch_metadata(None, timeout);
        if metadata.is_err() {
            // Deliver the error events queued while the request waited.
            client.poll(Duration::from_millis(200));
        }
        let causes = client.context().errors.lock().map(|e| e.clone()).unwrap_or_default();
        Ok((
            metadata.map(|md| Reached {
                brokers: md.brokers().len(),
                topics: md.topics().iter().map(|t| t.name().to_string()).collect(),
            }),
            causes,
        ))
    })
    .await;
    match outcome {
        Ok(Ok((Ok(reached), _))) => Ok(reached),
        Ok(Ok((Err(err), causes))) => Err(diagnose(servers, &err, &causes)),
        Ok(Err(err)) => Err(err),
        Err(join) => Err(ConnectError::Unreachable { servers, reason: join.to_string() }),
    }
}

/// Tells why a metadata request failed from the error events around it:
/// the credentials were refused, the TLS handshake failed, or else the
/// brokers could not be reached.
fn diagnose(servers: String, err: &KafkaError, causes: &[(RDKafkaErrorCode, String)]) -> ConnectError {
    let cause = |code: RDKafkaErrorCode| causes.iter().find(|(c, _)| *c == code).map(|(_, reason)| reason.clone());
    if let Some(reason) = cause(RDKafkaErrorCode::Authentication) {
        return ConnectError::Authentication { servers, reason };
    }
    if let Some(reason) = cause(RDKafkaErrorCode::SSL) {
        return ConnectError::Tls { servers, reason };
    }
    let reason = cause(RDKafkaErrorCode::BrokerTransportFailure).unwrap_or_else(|| err.to_string());
    ConnectError::Unreachable { servers, reason }
}

/// Collects the error events of the probe's client. A failed metadata
/// request only says "transport failure"; the cause (SASL authentication,
/// TLS handshake, connection refused) arrives as an error event with a
/// code, which only polling the client's main queue delivers (hence a
/// producer, which polls it, and sends nothing).
#[derive(Default)]
struct ProbeContext {
    errors: Mutex<Vec<(RDKafkaErrorCode, String)>>,
}

impl ClientContext for ProbeContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if let (Some(code), Ok(mut errors)) = (error.rdkafka_error_code(), self.errors.lock()) {
            errors.push((code, reason.to_string()));
        }
    }
}

impl ProducerContext for ProbeContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_told_apart_by_code() {
        let err = KafkaError::MetadataFetch(RDKafkaErrorCode::BrokerTransportFailure);
        let diagnose = |causes: &[(RDKafkaErrorCode, &str)]| {
            let causes: Vec<_> = causes.iter().map(|(c, r)| (*c, r.to_string())).collect();
            diagnose("b:1".into(), &err, &causes)
        };
        let refused = diagnose(&[(RDKafkaErrorCode::BrokerTransportFailure, "Connection refused")]);
        assert!(matches!(refused, ConnectError::Unreachable { ref reason, .. } if reason == "Connection refused"));
        assert!(!refused.needs_operator());
        let auth = diagnose(&[
            (RDKafkaErrorCode::AllBrokersDown, "1/1 brokers are down"),
            (RDKafkaErrorCode::Authentication, "SASL authentication error"),
        ]);
        assert!(matches!(auth, ConnectError::Authentication { .. }) && auth.needs_operator());
        assert!(auth.fix().contains("kafka.sasl.password"));
        let tls = diagnose(&[(RDKafkaErrorCode::SSL, "certificate verify failed")]);
        assert!(matches!(tls, ConnectError::Tls { .. }) && tls.fix().contains("kafka.tls_ca_file"));
        assert!(matches!(diagnose(&[]), ConnectError::Unreachable { .. }));
    }
}
