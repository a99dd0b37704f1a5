//! An example service for the demo: it changes orders and writes the
//! matching outbox rows in the same transaction, the pattern the relay is for.
//!
//! Each change locks the order row (the upsert), bumps its version, and
//! inserts an event message ("what happened") and a state message (the
//! order's full current state), so writes to one order are serialized and
//! per-entity order holds. An order goes placed -> paid -> shipped ->
//! delivered; its next change deletes it and writes its tombstone (a state
//! row with a NULL payload) in the same transaction. Versions live in
//! `order_versions`, which outlives a deleted order: a re-created order
//! continues its numbers, so a consumer that remembers a tombstone's version
//! never mistakes the new order's first state for a stale one. The payloads match the
//! Avro schemas in `schemas/order/`, so the same service feeds the JSON and
//! the Avro codec.

use std::time::Duration;

use clap::Parser;
use rand::Rng;
use tokio_postgres::NoTls;

/// Writes orders and their outbox rows, one transaction per change.
#[derive(Debug, Parser)]
#[command(name = "order-service")]
struct Args {
    /// Postgres URL of the outbox database.
    #[arg(long, env = "RELAY__POSTGRES__URL")]
    url: String,
    /// Changes per second.
    #[arg(long, default_value_t = 20)]
    rate: u32,
    /// Stop after this many seconds (0 = run until killed).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
    /// How many distinct orders to spread the changes over.
    #[arg(long, default_value_t = 10)]
    orders: u32,
}

/// The event of each status, and the next status.
const LIFECYCLE: [(&str, &str, &str); 4] = [
    ("placed", "OrderPlaced", "paid"),
    ("paid", "OrderPaid", "shipped"),
    ("shipped", "OrderShipped", "delivered"),
    ("delivered", "OrderDelivered", "deleted"),
];

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let (mut client, connection) = tokio_postgres::connect(&args.url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            eprintln!("order-service: connection closed: {err}");
        }
    });
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS orders (
                id text PRIMARY KEY,
                customer_id text NOT NULL,
                status text NOT NULL,
                total_cents bigint NOT NULL,
                version bigint NOT NULL,
                updated_at timestamptz NOT NULL DEFAULT now()
            );
            CREATE TABLE IF NOT EXISTS order_versions (id text PRIMARY KEY, version bigint NOT NULL)",
        )
        .await?;
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    let started = std::time::Instant::now();
    let mut ticker = tokio::time::interval(interval);
    let (mut written, mut deleted) = (0u64, 0u64);
    loop {
        ticker.tick().await;
        if args.seconds > 0 && started.elapsed() >= Duration::from_secs(args.seconds) {
            break;
        }
        let (order, customer, total) = {
            let mut rng = rand::rng();
            (
                format!("order-{}", rng.random_range(1..=args.orders.max(1))),
                format!("customer-{}", rng.random_range(1..=100)),
                rng.random_range(500..50_000i64),
            )
        };
        let tx = client.transaction().await?;
        if change_order(&tx, &order, &customer, total).await? {
            deleted += 1;
        }
        tx.commit().await?;
        written += 1;
        if written.is_multiple_of(100) {
            println!("order-service: {written} changes written ({deleted} orders deleted)");
        }
    }
    println!("order-service: done, {written} changes written ({deleted} orders deleted)");
    Ok(())
}

/// One change of `order` in `tx`: the domain row and its outbox rows.
/// Returns true when the change deleted the order.
async fn change_order(
    tx: &tokio_postgres::Transaction<'_>,
    order: &str,
    customer: &str,
    total: i64,
) -> Result<bool, tokio_postgres::Error> {
    // The version upsert locks the order's counter: concurrent writers of
    // one order queue here, whether or not the order exists right now.
    let version: i64 = tx
        .query_one(
            "INSERT INTO order_versions (id, version) VALUES ($1, 1)
             ON CONFLICT (id) DO UPDATE SET version = order_versions.version + 1 RETURNING version",
            &[&order],
        )
        .await?
        .get(0);
    let row = tx
        .query_one(
            "INSERT INTO orders (id, customer_id, status, total_cents, version) VALUES ($1, $2, 'placed', $3, $4)
             ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version,
                 status = CASE orders.status WHEN 'placed' THEN 'paid' WHEN 'paid' THEN 'shipped'
                     WHEN 'shipped' THEN 'delivered' ELSE 'deleted' END,
                 updated_at = now()
             RETURNING status, version, customer_id, total_cents,
                 to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            &[&order, &customer, &total, &version],
        )
        .await?;
    let status: String = row.get(0);
    let customer: String = row.get(2);
    let total: i64 = row.get(3);
    let updated_at: String = row.get(4);
    if status == "deleted" {
        // The entity is gone: delete it and publish its tombstone, atomically.
        tx.execute("DELETE FROM orders WHERE id = $1", &[&order]).await?;
        tx.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, entity_version, payload)
             VALUES ('order', $1, 'OrderDeleted', 'state', $2, NULL)",
            &[&order, &version],
        )
        .await?;
        return Ok(true);
    }
    let amount = format!("{}.{:02}", total / 100, total % 100);
    let event_type = LIFECYCLE.iter().find(|(s, _, _)| *s == status).map_or("OrderPlaced", |(_, e, _)| *e);
    let data = match status.as_str() {
        "placed" => serde_json::json!({
            "order_id": order, "customer_id": customer, "total": amount, "currency": "EUR",
            "items": [{ "sku": "MUG-01", "quantity": 1, "unit_price": amount }],
        }),
        "paid" => serde_json::json!({ "amount": amount, "paid_at": updated_at }),
        "shipped" => serde_json::json!({
            "carrier": "DHL", "tracking": format!("JD{:018}", version), "shipped_on": &updated_at[..10],
        }),
        _ => serde_json::json!({ "delivered_at": updated_at }),
    };
    let event = serde_json::json!({ "data": data });
    let state = serde_json::json!({
        "order_id": order, "customer_id": customer, "status": status.to_uppercase(),
        "total": amount, "currency": "EUR", "version": version, "updated_at": updated_at,
    });
    tx.execute(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, entity_version, payload)
         VALUES ('order', $1, $2, 'event', $3, $4), ('order', $1, 'OrderState', 'state', $3, $5)",
        &[&order, &event_type, &version, &event, &state],
    )
    .await?;
    Ok(false)
}
