"""An independent Kafka client for the connector tests and benchmarks (confluent-kafka, that
is librdkafka). Commands:

  create-topic BOOTSTRAP TOPIC PARTITIONS
  produce BOOTSTRAP TOPIC          JSON lines on stdin: {"partition", "key", "value", "headers"}
  consume BOOTSTRAP TOPIC          every record of every partition, as JSON lines
  bench-produce BOOTSTRAP TOPIC COUNT BYTES   prints {"records", "seconds"}

Values and keys travel as UTF-8 text; headers as {name: text}. Consumers assign partitions by
hand and read to each partition's end, with no consumer group or idempotence involved.
"""

import json
import sys
import time

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def create_topic(bootstrap, topic, partitions):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=int(partitions), replication_factor=1)])
    for future in futures.values():
        future.result(timeout=30)


def producer(bootstrap, **extra):
    config = {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "enable.idempotence": False,
        "linger.ms": 5,
    }
    config.update(extra)
    return Producer(config)


def produce(bootstrap, topic):
    out = producer(bootstrap)
    failures = []

    def delivered(error, _message):
        if error is not None:
            failures.append(str(error))

    count = 0
    for line in sys.stdin:
        if not line.strip():
            continue
        record = json.loads(line)
        kwargs = {"value": record["value"].encode(), "on_delivery": delivered}
        if record.get("key") is not None:
            kwargs["key"] = record["key"].encode()
        if record.get("partition") is not None:
            kwargs["partition"] = record["partition"]
        if record.get("headers"):
            kwargs["headers"] = [(name, value.encode()) for name, value in record["headers"].items()]
        while True:
            try:
                out.produce(topic, **kwargs)
                break
            except BufferError:
                out.poll(0.1)
        count += 1
        out.poll(0)
    remaining = out.flush(60)
    if remaining or failures:
        sys.exit(f"{remaining} records undelivered; failures: {failures[:5]}")
    print(json.dumps({"produced": count}))


def partitions_of(bootstrap, topic):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    metadata = admin.list_topics(topic, timeout=30)
    return sorted(metadata.topics[topic].partitions)


def text(value):
    return None if value is None else value.decode("utf-8", "replace")


def consume(bootstrap, topic):
    partitions = partitions_of(bootstrap, topic)
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "refract-tests",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
    })
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    at_end = set()
    deadline = time.time() + 60
    while len(at_end) < len(partitions):
        if time.time() > deadline:
            sys.exit(f"partitions {set(partitions) - at_end} did not reach their end in 60 s")
        for message in consumer.consume(500, 1.0):
            error = message.error()
            if error is not None:
                if error.code() == -191:  # _PARTITION_EOF
                    at_end.add(message.partition())
                    continue
                raise KafkaException(error)
            at_end.discard(message.partition())
            print(json.dumps({
                "partition": message.partition(),
                "offset": message.offset(),
                "key": text(message.key()),
                "value": text(message.value()),
                "headers": {name: text(value) for name, value in (message.headers() or [])},
            }))
    consumer.close()


def bench_produce(bootstrap, topic, count, size):
    out = producer(bootstrap, **{"compression.type": "zstd", "linger.ms": 20})
    value = b"x" * int(size)
    started = time.time()
    for n in range(int(count)):
        while True:
            try:
                out.produce(topic, value=value, key=f"stream-{n % 1000}".encode())
                break
            except BufferError:
                out.poll(0.05)
        out.poll(0)
    if out.flush(120):
        sys.exit("records left undelivered")
    print(json.dumps({"records": int(count), "seconds": time.time() - started}))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {
        "create-topic": create_topic,
        "produce": produce,
        "consume": consume,
        "bench-produce": bench_produce,
    }[command](*args)
