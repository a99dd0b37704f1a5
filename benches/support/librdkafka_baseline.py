"""librdkafka alone, for the scale harness's many-topics case.

Produces MESSAGES records shaped like the relay's (key `e-<n>` over 1,000
entities, ~250 B JSON value, six headers) to TOPICS fresh topics of six
partitions, each entity on one topic, with the relay's producer settings
(idempotence, acks=all, murmur2_random, lz4, linger 5 ms), through Python's
confluent-kafka (librdkafka underneath, written by nobody here). Paced at
RATE records/s, or as fast as it goes with RATE 0. Waits for every delivery
report; any delivery error fails the run.

Prints one JSON line: rate, CPU seconds per 100k records (the process: the
interpreter and librdkafka's threads) and peak RSS in MiB.

    python librdkafka_baseline.py BOOTSTRAP PREFIX TOPICS MESSAGES RATE
"""

import json
import resource
import sys
import time

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

ENTITIES = 1_000
PAYLOAD = b'{"pad": "' + b"x" * 200 + b'", "seq": 1}'
HEADERS = [
    ("event_id", b"0b7c6f3e-4f7a-4d55-9c2e-2f4f0e4b9a11"),
    ("event_type", b"Changed"),
    ("kind", b"event"),
    ("aggregate_type", b"entity"),
    ("occurred_at", b"2026-12-01T12:00:00.000000Z"),
    ("entity_version", b"1"),
]


def main() -> None:
    bootstrap, prefix = sys.argv[1], sys.argv[2]
    topics_n, messages, rate = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    topics = [f"{prefix}.{i}" for i in range(topics_n)]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(t, 6, 1) for t in topics]).values():
        future.result(timeout=60)
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",
            "compression.type": "lz4",
            "linger.ms": 5,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 100_000,
        }
    )
    failures = []

    def delivered(err, _msg):
        if err is not None:
            failures.append(err)

    # One record per topic first: metadata and the producer id are not
    # part of what is measured (the relay's drain starts warm too after its
    # first few records).
    for topic in topics:
        producer.produce(topic, b"warm-up", key=b"warm-up", on_delivery=delivered)
    if producer.flush(60) != 0:
        raise SystemExit("librdkafka baseline: warm-up not delivered within 60 s")
    keys = [f"e-{e}".encode() for e in range(ENTITIES)]
    cpu_start, start = time.process_time(), time.monotonic()
    for i in range(messages):
        if rate and i % 100 == 0:
            ahead = start + i / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        entity = i % ENTITIES
        while True:
            try:
                producer.produce(
                    topics[entity % topics_n], PAYLOAD, key=keys[entity], headers=HEADERS, on_delivery=delivered
                )
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    if producer.flush(120) != 0:
        raise SystemExit("librdkafka baseline: records not delivered within 120 s")
    elapsed, cpu = time.monotonic() - start, time.process_time() - cpu_start
    if failures:
        raise SystemExit(f"librdkafka baseline: {len(failures)} delivery errors, first: {failures[0]}")
    for future in admin.delete_topics(topics).values():
        future.result(timeout=60)
    print(
        json.dumps(
            {
                "rate": messages / elapsed,
                "cpu_per_100k": cpu * 100_000 / messages,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


if __name__ == "__main__":
    try:
        main()
    except KafkaException as error:
        raise SystemExit(f"librdkafka baseline: {error}")
