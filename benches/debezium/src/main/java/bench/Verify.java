package bench;

import java.nio.charset.StandardCharsets;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.Statement;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;

import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.TopicPartition;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;

/**
 * Completeness and per-key order of everything a system published: reads
 * the topic from the beginning to the end offsets taken at start; every
 * outbox row's event_id must be among the records; per key (which must equal
 * the payload's entity), the first occurrences of its messages must carry
 * seq 1, 2, ..., n (duplicates may repeat an earlier message, never reorder).
 * Prints one JSON line of counts; exit 1 on any loss or disorder.
 */
final class Verify {
    private Verify() {
    }

    static int run(Main.Opts o) throws Exception {
        String topic = o.get("topic");
        ObjectMapper json = new ObjectMapper();
        Set<String> ids = new HashSet<>();
        Map<String, Long> lastSeq = new HashMap<>();
        long records = 0;
        long duplicates = 0;
        List<String> problems = new ArrayList<>();
        try (KafkaConsumer<byte[], byte[]> c = Tools.consumer(o.get("bootstrap"))) {
            List<TopicPartition> parts = Tools.partitions(c, topic);
            if (parts.isEmpty()) {
                System.err.println("verify: topic " + topic + " does not exist");
                return 1;
            }
            Map<TopicPartition, Long> ends = Tools.ends(c, parts);
            c.assign(parts);
            c.seekToBeginning(parts);
            Set<TopicPartition> open = new HashSet<>();
            for (TopicPartition tp : parts) {
                if (ends.get(tp) > 0) {
                    open.add(tp);
                }
            }
            long deadline = System.currentTimeMillis() + 300_000;
            while (!open.isEmpty()) {
                if (System.currentTimeMillis() > deadline) {
                    System.err.println("verify: could not read to the end offsets of " + open);
                    return 1;
                }
                // Partition order is all Kafka promises and all that per-key order needs.
                for (ConsumerRecord<byte[], byte[]> r : c.poll(Duration.ofMillis(200))) {
                    TopicPartition tp = new TopicPartition(r.topic(), r.partition());
                    if (r.offset() >= ends.get(tp)) {
                        continue;
                    }
                    if (r.offset() == ends.get(tp) - 1) {
                        open.remove(tp);
                    }
                    records++;
                    String id = Tools.header(r, "event_id");
                    if (id == null) {
                        problems.add("record without event_id at " + tp + "@" + r.offset());
                        continue;
                    }
                    if (!ids.add(id)) {
                        duplicates++;
                        continue;
                    }
                    String key = new String(r.key(), StandardCharsets.UTF_8);
                    JsonNode value = json.readTree(r.value());
                    long seq = value.get("seq").asLong();
                    if (!key.equals(value.get("entity").asText())) {
                        problems.add("key " + key + " carries entity " + value.get("entity").asText());
                    }
                    long expected = lastSeq.getOrDefault(key, 0L) + 1;
                    if (seq != expected) {
                        problems.add("key " + key + ": seq " + seq + " where " + expected + " was due, at " + tp + "@" + r.offset());
                    }
                    lastSeq.put(key, Math.max(seq, lastSeq.getOrDefault(key, 0L)));
                }
            }
        }
        long rows = 0;
        long missing = 0;
        List<String> missingIds = new ArrayList<>();
        try (Connection db = DriverManager.getConnection(o.get("jdbc")); Statement s = db.createStatement();
                ResultSet r = s.executeQuery("SELECT event_id::text FROM outbox")) {
            while (r.next()) {
                rows++;
                if (!ids.contains(r.getString(1))) {
                    missing++;
                    if (missingIds.size() < 10) {
                        missingIds.add(r.getString(1));
                    }
                }
            }
        }
        System.out.printf("{\"records\": %d, \"distinct\": %d, \"duplicates\": %d, \"rows\": %d, \"missing\": %d, \"order_problems\": %d, \"keys\": %d}%n",
                records, ids.size(), duplicates, rows, missing, problems.size(), lastSeq.size());
        for (String p : problems.subList(0, Math.min(10, problems.size()))) {
            System.err.println("verify: " + p);
        }
        if (missing > 0) {
            System.err.println("verify: " + missing + " rows never reached Kafka, e.g. " + missingIds);
        }
        return missing == 0 && problems.isEmpty() && rows > 0 ? 0 : 1;
    }
}
