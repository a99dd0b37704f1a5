"""Reads every record of the given topics up to their end offsets with
Confluent's own Python client, as a consumer with the given
isolation.level would, and prints each as a JSON line (topic, partition,
offset, key, event_id header, value, and value_is_none: true for a
tombstone).

Usage: consume_to_end.py BOOTSTRAP ISOLATION_LEVEL TOPIC [TOPIC...]
ISOLATION_LEVEL is read_committed or read_uncommitted. The end offsets are
taken once every partition is assigned; exits non-zero if they are not
reached within 90 s.
"""
import json
import sys
import time
import uuid

from confluent_kafka import Consumer, TopicPartition


def main():
    bootstrap, isolation, topics = sys.argv[1], sys.argv[2], sys.argv[3:]
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"interop-{uuid.uuid4()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "isolation.level": isolation,
    })
    partitions = []
    for topic in topics:
        metadata = consumer.list_topics(topic, timeout=10)
        for p in metadata.topics[topic].partitions:
            partitions.append(TopicPartition(topic, p, 0))
    consumer.assign(partitions)
    ends = {}
    for tp in partitions:
        low, high = consumer.get_watermark_offsets(tp, timeout=10)
        ends[(tp.topic, tp.partition)] = high
    deadline = time.time() + 90
    while True:
        positions = consumer.position(partitions)
        if all(p.offset >= ends[(p.topic, p.partition)] or ends[(p.topic, p.partition)] == 0 for p in positions):
            break
        if time.time() > deadline:
            sys.exit(f"end offsets {ends} not reached: {[(p.partition, p.offset) for p in positions]}")
        message = consumer.poll(0.5)
        if message is None:
            continue
        if message.error():
            sys.exit(f"consume error: {message.error()}")
        headers = dict(message.headers() or [])
        print(json.dumps({
            "topic": message.topic(),
            "partition": message.partition(),
            "offset": message.offset(),
            "key": (message.key() or b"").decode(),
            "event_id": (headers.get("event_id") or b"").decode(),
            "value": (message.value() or b"").decode(),
            "value_is_none": message.value() is None,
        }), flush=True)
    consumer.close()


if __name__ == "__main__":
    main()
