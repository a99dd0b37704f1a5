//! The dead-letter topic (`routing.dead_letter_topic`): a JSON copy of every
//! held row, with the reason, for the [`Holder`](crate::hold::Holder) to
//! send whichever way the row was held.

use futures::future::BoxFuture;
use futures::FutureExt;

use super::record;
use super::reports::KafkaProducer;
use super::topics::Topics;
use crate::delivery::RoutedRow;
use crate::hold::DeadLetter;
use crate::routing::TopicKind;

/// Sends the copies to one topic through the sink's producer.
pub struct DeadLetterTopic {
    topic: String,
    producer: KafkaProducer,
    topics: Topics,
}

impl DeadLetterTopic {
    pub fn new(topic: String, producer: KafkaProducer, topics: Topics) -> Self {
        Self { topic, producer, topics }
    }

    async fn send_copy(&self, row: &RoutedRow, reason: &str) {
        let (row_id, topic) = (row.row.id, self.topic.clone());
        if let Err(err) = self.topics.ensure(&topic, TopicKind::Event, None).await {
            tracing::warn!(row_id, topic = %topic, error = %err, "cannot reach the dead-letter topic");
            return;
        }
        match record::produce(&self.producer, record::dead_letter(&topic, row, reason)).await {
            Ok(delivery) => {
                tokio::spawn(async move {
                    if let Err(err) = delivery.await {
                        tracing::warn!(row_id, topic = %topic, error = %err, "dead-letter copy not delivered");
                    }
                });
            }
            Err(err) => tracing::warn!(row_id, topic = %topic, error = %err, "dead-letter copy not sent"),
        }
    }
}

impl DeadLetter for DeadLetterTopic {
    fn send<'a>(&'a self, row: &'a RoutedRow, reason: &'a str) -> BoxFuture<'a, ()> {
        self.send_copy(row, reason).boxed()
    }
}
