//! How Kafka errors become a [`PublishError`]: permanent (the row is held)
//! or retriable (the run restarts from its last confirmed boundary).

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::delivery::PublishError;
use crate::error_class::Leaf;

/// Tells permanent Kafka errors (the same record can never succeed) from
/// transient ones. `InvalidMessage` (CORRUPT_MESSAGE, a CRC mismatch on the
/// way) is transient: the same record sent again succeeds. A timestamp the
/// topic refuses (`message.timestamp.*.max.ms`) needs the topic's settings
/// fixed: permanent.
pub fn classify(err: KafkaError) -> PublishError {
    use RDKafkaErrorCode as C;
    let permanent = matches!(
        err.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidRecord
                | C::InvalidTimestamp
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::InvalidTopic
                | C::UnknownTopic
                | C::UnknownTopicOrPartition
                | C::PolicyViolation
                | C::InvalidRequiredAcks
        )
    );
    let outcome = if permanent {
        PublishError::permanent("Kafka refused the record")
    } else {
        PublishError::retriable("Kafka gave up on the record")
    };
    outcome.because(Leaf(err))
}

/// [`classify`] for a record of `topic`, with an authorization refusal
/// spelled as its fix: which ACL, on which resource, for which principal
/// (`principal` as in `KafkaConfig::principal`). The broker refuses a
/// produce request with TOPIC_AUTHORIZATION_FAILED when the principal lacks
/// WRITE on the topic (librdkafka reports it in the delivery report; a
/// metadata refusal, no DESCRIBE, too). Both are permanent: the row is held
/// and `relay held retry` sends it again once the ACL is granted.
pub fn classify_for_topic(err: KafkaError, topic: &str, principal: &str) -> PublishError {
    let refusal = match err.rdkafka_error_code() {
        Some(RDKafkaErrorCode::TopicAuthorizationFailed) => PublishError::permanent(format!(
            "not authorized to write to topic `{topic}`: grant WRITE on TOPIC {topic} to {principal} (and DESCRIBE, which it needs too), then `relay held retry`"
        )),
        Some(RDKafkaErrorCode::ClusterAuthorizationFailed) => PublishError::permanent(format!(
            "not authorized on the cluster while writing to topic `{topic}`: brokers before Kafka 3.0 need IDEMPOTENT_WRITE on CLUSTER for {principal}; grant it, then `relay held retry`"
        )),
        _ => return classify(err),
    };
    refusal.because(Leaf(err))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(code: RDKafkaErrorCode) -> &'static str {
        match classify(KafkaError::MessageProduction(code)) {
            PublishError::Permanent { .. } => "permanent",
            PublishError::Retriable { .. } => "retriable",
        }
    }

    #[test]
    fn kafka_errors_are_classified() {
        assert_eq!(class(RDKafkaErrorCode::MessageSizeTooLarge), "permanent");
        assert_eq!(class(RDKafkaErrorCode::TopicAuthorizationFailed), "permanent");
        assert_eq!(class(RDKafkaErrorCode::InvalidTimestamp), "permanent");
        // CORRUPT_MESSAGE: a CRC mismatch on the way; the same record sent again succeeds.
        assert_eq!(class(RDKafkaErrorCode::InvalidMessage), "retriable");
        assert_eq!(class(RDKafkaErrorCode::NotEnoughReplicas), "retriable");
        assert_eq!(class(RDKafkaErrorCode::RequestTimedOut), "retriable");
    }

    #[test]
    fn an_authorization_refusal_names_the_topic_and_the_acl() {
        let err = KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed);
        match classify_for_topic(err, "orders", "User:relay") {
            permanent @ PublishError::Permanent { .. } => {
                let text = permanent.reason();
                assert!(text.contains("grant WRITE on TOPIC orders to User:relay"), "{text}");
                assert!(text.contains("not authorized to write to topic `orders`"), "{text}");
            }
            other => panic!("must be permanent: {other:?}"),
        }
        let err = KafkaError::MessageProduction(RDKafkaErrorCode::RequestTimedOut);
        assert!(matches!(classify_for_topic(err, "orders", "User:relay"), PublishError::Retriable { .. }));
    }
}
