package bench;

import java.io.BufferedWriter;
import java.io.FileWriter;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.time.Instant;
import java.time.OffsetDateTime;
import java.util.ArrayList;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

/** The Kafka-side tools the harness runs the same way for both systems. */
final class Tools {
    private Tools() {
    }

    static KafkaConsumer<byte[], byte[]> consumer(String bootstrap) {
        Properties p = new Properties();
        p.put("bootstrap.servers", bootstrap);
        p.put("key.deserializer", ByteArrayDeserializer.class.getName());
        p.put("value.deserializer", ByteArrayDeserializer.class.getName());
        p.put("enable.auto.commit", "false");
        p.put("fetch.max.wait.ms", "10");
        p.put("max.poll.records", "5000");
        return new KafkaConsumer<>(p);
    }

    /** The topic's partitions, or an empty list while it does not exist. */
    static List<TopicPartition> partitions(KafkaConsumer<byte[], byte[]> c, String topic) {
        List<TopicPartition> out = new ArrayList<>();
        try {
            List<PartitionInfo> infos = c.partitionsFor(topic, Duration.ofSeconds(5));
            if (infos != null) {
                for (PartitionInfo i : infos) {
                    out.add(new TopicPartition(topic, i.partition()));
                }
            }
        }
        catch (Exception e) {
            // not there yet
        }
        return out;
    }

    static int createTopic(Main.Opts o) throws Exception {
        Properties p = new Properties();
        p.put("bootstrap.servers", o.get("bootstrap"));
        try (Admin admin = Admin.create(p)) {
            NewTopic topic = new NewTopic(o.get("topic"), (int) o.num("partitions", 6), (short) 1);
            if (Boolean.parseBoolean(o.get("compact", "false"))) {
                // As the relay creates its state topics.
                topic.configs(Map.of("cleanup.policy", "compact"));
            }
            admin.createTopics(List.of(topic)).all().get();
        }
        return 0;
    }

    /**
     * Samples the sum of the topic's end offsets every interval and writes
     * "epoch_ms,count" lines until the count reaches --expect. Prints "ready"
     * on stdout once connected, so the harness starts the clock after it.
     */
    static int watch(Main.Opts o) throws Exception {
        String topic = o.get("topic");
        long expect = o.num("expect");
        long deadline = System.currentTimeMillis() + o.num("timeout-s", 900) * 1000;
        long interval = o.num("interval-ms", 50);
        try (KafkaConsumer<byte[], byte[]> c = consumer(o.get("bootstrap"));
                BufferedWriter out = new BufferedWriter(new FileWriter(o.get("out")))) {
            c.listTopics(Duration.ofSeconds(30));
            System.out.println("ready");
            System.out.flush();
            List<TopicPartition> parts = List.of();
            long count = 0;
            while (count < expect) {
                if (System.currentTimeMillis() > deadline) {
                    System.err.printf("watch: timed out at %d of %d%n", count, expect);
                    return 1;
                }
                long t = System.currentTimeMillis();
                if (parts.isEmpty()) {
                    parts = partitions(c, topic);
                }
                count = 0;
                if (!parts.isEmpty()) {
                    for (Long end : c.endOffsets(parts, Duration.ofSeconds(10)).values()) {
                        count += end;
                    }
                }
                out.write(t + "," + count + "\n");
                out.flush();
                long sleep = interval - (System.currentTimeMillis() - t);
                if (sleep > 0 && count < expect) {
                    Thread.sleep(sleep);
                }
            }
        }
        return 0;
    }

    static String header(ConsumerRecord<byte[], byte[]> r, String key) {
        Header h = r.headers().lastHeader(key);
        if (h == null || h.value() == null) {
            return null;
        }
        String text = new String(h.value(), StandardCharsets.UTF_8);
        // Debezium's JSON header converter (schemas off) quotes strings.
        if (text.length() >= 2 && text.startsWith("\"") && text.endsWith("\"")) {
            return text.substring(1, text.length() - 1);
        }
        return text;
    }

    /**
     * From the topic's current end, receives records until --expect distinct
     * event ids arrived; writes per record the seconds from its occurred_at
     * header (the row's transaction start, i.e. about its commit: the
     * transactions are short) to its receipt. Prints "ready" once positioned.
     */
    static int latency(Main.Opts o) throws Exception {
        String topic = o.get("topic");
        long expect = o.num("expect");
        long deadline = System.currentTimeMillis() + o.num("timeout-s", 300) * 1000;
        Set<String> seen = new HashSet<>();
        try (KafkaConsumer<byte[], byte[]> c = consumer(o.get("bootstrap"));
                BufferedWriter out = new BufferedWriter(new FileWriter(o.get("out")))) {
            List<TopicPartition> parts = partitions(c, topic);
            if (parts.isEmpty()) {
                System.err.println("latency: topic " + topic + " does not exist");
                return 1;
            }
            c.assign(parts);
            c.seekToEnd(parts);
            for (TopicPartition tp : parts) {
                c.position(tp);
            }
            System.out.println("ready");
            System.out.flush();
            while (seen.size() < expect) {
                if (System.currentTimeMillis() > deadline) {
                    System.err.printf("latency: timed out with %d of %d records%n", seen.size(), expect);
                    return 1;
                }
                for (ConsumerRecord<byte[], byte[]> r : c.poll(Duration.ofMillis(50))) {
                    Instant now = Instant.now();
                    String id = header(r, "event_id");
                    String occurred = header(r, "occurred_at");
                    if (id == null || occurred == null) {
                        System.err.println("latency: a record without event_id or occurred_at header");
                        return 1;
                    }
                    if (seen.add(id)) {
                        Instant at = OffsetDateTime.parse(occurred).toInstant();
                        double secs = Duration.between(at, now).toNanos() / 1e9;
                        out.write(String.format("%.6f%n", secs));
                    }
                }
            }
        }
        return 0;
    }

    static Map<TopicPartition, Long> ends(KafkaConsumer<byte[], byte[]> c, List<TopicPartition> parts) {
        return c.endOffsets(parts, Duration.ofSeconds(10));
    }
}
