//! RabbitMQ: connecting, declaring the topology, consuming with manual acks,
//! and publishing with publisher confirms. Knows nothing of browsers.

use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};

use crate::config::{AmqpSettings, QueueType};

/// Header carrying the attempt number of a republished task (1 on first publish).
pub const ATTEMPT_HEADER: &str = "x-browserfleet-attempt";
/// Header carrying the JSON attempt history of a republished task.
pub const HISTORY_HEADER: &str = "x-browserfleet-history";
/// Header on dead-lettered messages: why it was dead-lettered.
pub const REASON_HEADER: &str = "x-browserfleet-reason";
/// Header on dead-lettered messages: the detail.
pub const DETAIL_HEADER: &str = "x-browserfleet-detail";

/// A broker failure.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// An AMQP operation failed (connection lost, precondition failed, ...).
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker refused (nacked) a publish.
    #[error("the broker nacked a publish to `{0}`")]
    Nacked(String),
    /// No confirm arrived within `amqp.confirm_timeout_ms`.
    #[error("no publisher confirm for `{0}` within {1:?}")]
    ConfirmTimeout(String, Duration),
}

/// An open connection with one confirming channel.
pub struct Broker {
    /// The connection; closing it ends everything.
    pub connection: Connection,
    /// The channel used to consume, ack and publish (confirm mode).
    pub channel: Channel,
    confirm_timeout: Duration,
}

impl Broker {
    /// Connects, enables confirms and sets the prefetch.
    pub async fn connect(settings: &AmqpSettings, prefetch: u16) -> Result<Self, BrokerError> {
        let props = ConnectionProperties::default().with_connection_name(LongString::from(
            format!("browserfleet-{}", std::process::id()),
        ));
        let connection = Connection::connect(settings.url.expose(), props).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        Ok(Broker {
            connection,
            channel,
            confirm_timeout: Duration::from_millis(settings.confirm_timeout_ms),
        })
    }

    /// Declares the task, result and dead-letter queues (idempotent).
    ///
    /// The task queue dead-letters to the dead-letter queue, so a message the
    /// broker itself gives up on (quorum delivery limit) lands there too.
    pub async fn declare_topology(&self, s: &AmqpSettings) -> Result<(), BrokerError> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let base = queue_args(s.queue_type, None);
        self.channel
            .queue_declare(s.dead_letter_queue.as_str().into(), durable, base.clone())
            .await?;
        self.channel
            .queue_declare(s.result_queue.as_str().into(), durable, base)
            .await?;
        let mut task_args = queue_args(s.queue_type, Some(s.delivery_limit));
        task_args.insert("x-dead-letter-exchange".into(), string(""));
        task_args.insert(
            "x-dead-letter-routing-key".into(),
            string(&s.dead_letter_queue),
        );
        self.channel
            .queue_declare(s.task_queue.as_str().into(), durable, task_args)
            .await?;
        Ok(())
    }

    /// Starts consuming `queue` with manual acks.
    pub async fn consume(&self, queue: &str, tag: &str) -> Result<Consumer, BrokerError> {
        Ok(self
            .channel
            .basic_consume(
                queue.into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?)
    }

    /// Publishes to a queue through the default exchange and waits for the
    /// broker's confirm: only then is the message the broker's responsibility.
    pub async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        publish_confirmed(&self.channel, queue, body, properties, self.confirm_timeout).await
    }
}

/// Publishes on a confirm-mode channel and waits for the broker's ack.
pub async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
    timeout: Duration,
) -> Result<(), BrokerError> {
    let fut = async {
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await?
            .await?;
        if confirm.is_ack() {
            Ok(())
        } else {
            Err(BrokerError::Nacked(queue.to_string()))
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(BrokerError::ConfirmTimeout(queue.to_string(), timeout)),
    }
}

fn queue_args(kind: QueueType, delivery_limit: Option<u32>) -> FieldTable {
    let mut args = FieldTable::default();
    match kind {
        QueueType::Quorum => {
            args.insert("x-queue-type".into(), string("quorum"));
            if let Some(limit) = delivery_limit {
                args.insert(
                    "x-delivery-limit".into(),
                    AMQPValue::LongLongInt(limit.into()),
                );
            }
        }
        QueueType::Classic => {
            args.insert("x-queue-type".into(), string("classic"));
        }
    }
    args
}

/// An AMQP long-string value.
pub fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Reads a header as an integer, whatever integer type the sender used.
pub fn header_int(headers: Option<&FieldTable>, key: &str) -> Option<i64> {
    match headers?.inner().get(key)? {
        AMQPValue::ShortShortInt(v) => Some((*v).into()),
        AMQPValue::ShortShortUInt(v) => Some((*v).into()),
        AMQPValue::ShortInt(v) => Some((*v).into()),
        AMQPValue::ShortUInt(v) => Some((*v).into()),
        AMQPValue::LongInt(v) => Some((*v).into()),
        AMQPValue::LongUInt(v) => Some((*v).into()),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().parse().ok(),
        _ => None,
    }
}

/// Reads a header as a string.
pub fn header_str(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}
