"""Consumes Avro records with Confluent's own Python client and its
schema-registry AvroDeserializer, and prints each as a JSON line.

Usage: consume_avro.py BOOTSTRAP REGISTRY_URL COUNT TOPIC [TOPIC...]
Exits non-zero if COUNT records do not arrive within 60 s. An https
REGISTRY_URL is verified against the CA file in REGISTRY_CA_FILE if set.
"""
import datetime
import decimal
import json
import os
import sys
import time
import uuid

from confluent_kafka import Consumer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext


def plain(value):
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot print {type(value)}")


def main():
    bootstrap, registry_url, count, topics = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"interop-{uuid.uuid4()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    registry = {"url": registry_url}
    if os.environ.get("REGISTRY_CA_FILE"):
        registry["ssl.ca.location"] = os.environ["REGISTRY_CA_FILE"]
    deserializer = AvroDeserializer(SchemaRegistryClient(registry))
    consumer.subscribe(topics)
    seen = 0
    deadline = time.monotonic() + 60
    while seen < count and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        raw = msg.value()
        # A tombstone (null value) is None, with no schema to look up.
        value = None if raw is None else deserializer(raw, SerializationContext(msg.topic(), MessageField.VALUE))
        headers = {k: (v.decode() if v is not None else None) for k, v in (msg.headers() or [])}
        raw_key = msg.key()
        # A key in the Confluent wire format starts with the magic byte 0.
        if raw_key[:1] == b"\x00":
            key = deserializer(raw_key, SerializationContext(msg.topic(), MessageField.KEY))
        else:
            key = raw_key.decode()
        print(json.dumps({
            "topic": msg.topic(),
            "key": key,
            "key_magic": raw_key[0],
            "partition": msg.partition(),
            "offset": msg.offset(),
            "magic": raw[0] if raw else None,
            "schema_id": int.from_bytes(raw[1:5], "big") if raw else None,
            "headers": headers,
            "value": value,
        }, default=plain), flush=True)
        seen += 1
    consumer.close()
    if seen < count:
        print(f"only {seen} of {count} records arrived", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
