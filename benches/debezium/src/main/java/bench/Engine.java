package bench;

import java.io.FileInputStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;

import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.header.internals.RecordHeaders;
import org.apache.kafka.common.serialization.ByteArraySerializer;

import io.debezium.engine.ChangeEvent;
import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.Header;
import io.debezium.engine.format.KeyValueHeaderChangeEventFormat;
import io.debezium.engine.format.Json;
import io.debezium.engine.format.SimpleString;

/**
 * The Debezium embedded engine (async engine, Postgres connector, outbox
 * EventRouter SMT, String converters for key, value and headers) feeding a
 * sink that does what Debezium Server 3.x's Kafka sink
 * (io.debezium.server.kafka.KafkaChangeConsumer) does: send the whole batch
 * asynchronously, wait for every acknowledgement, mark each record processed,
 * then mark the batch finished (the engine then commits offsets, and the
 * connector confirms the slot position on its next offset commit).
 *
 * Properties file: every key not starting with "producer." goes to the engine
 * (connector and SMT settings); "producer.*" keys configure the KafkaProducer.
 */
final class Engine {
    private Engine() {
    }

    static int run(Main.Opts o) throws Exception {
        Properties all = new Properties();
        try (var in = new FileInputStream(o.get("props"))) {
            all.load(in);
        }
        Properties engineProps = new Properties();
        Properties producerProps = new Properties();
        for (String k : all.stringPropertyNames()) {
            if (k.startsWith("producer.")) {
                producerProps.put(k.substring("producer.".length()), all.getProperty(k));
            }
            else {
                engineProps.put(k, all.getProperty(k));
            }
        }
        producerProps.put("key.serializer", ByteArraySerializer.class.getName());
        producerProps.put("value.serializer", ByteArraySerializer.class.getName());
        long waitTimeoutMs = Long.parseLong(all.getProperty("sink.wait.message.delivery.timeout.ms", "30000"));

        KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(producerProps);
        Sink sink = new Sink(producer, waitTimeoutMs);
        CountDownLatch stopped = new CountDownLatch(1);
        int[] exit = {0};
        DebeziumEngine<ChangeEvent<String, String>> engine = DebeziumEngine
                .create(KeyValueHeaderChangeEventFormat.of(SimpleString.class, SimpleString.class, Json.class),
                        "io.debezium.embedded.async.ConvertingAsyncEngineBuilderFactory")
                .using(engineProps)
                .notifying(sink)
                .using((success, message, error) -> {
                    if (!success) {
                        System.err.println("engine stopped with an error: " + message);
                        if (error != null) {
                            error.printStackTrace();
                        }
                        exit[0] = 1;
                    }
                    stopped.countDown();
                })
                .build();
        ExecutorService executor = Executors.newSingleThreadExecutor();
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                engine.close();
                stopped.await(20, TimeUnit.SECONDS);
                producer.close(java.time.Duration.ofSeconds(5));
            }
            catch (Exception e) {
                e.printStackTrace();
            }
        }));
        executor.execute(engine);
        System.err.println("engine started");
        stopped.await();
        executor.shutdown();
        return exit[0];
    }

    /** Debezium Server 3.x's Kafka sink, minus its configuration plumbing. */
    static final class Sink implements DebeziumEngine.ChangeConsumer<ChangeEvent<String, String>> {
        private final KafkaProducer<byte[], byte[]> producer;
        private final long waitTimeoutMs;

        Sink(KafkaProducer<byte[], byte[]> producer, long waitTimeoutMs) {
            this.producer = producer;
            this.waitTimeoutMs = waitTimeoutMs;
        }

        @Override
        public void handleBatch(List<ChangeEvent<String, String>> records,
                                DebeziumEngine.RecordCommitter<ChangeEvent<String, String>> committer)
                throws InterruptedException {
            List<Future<RecordMetadata>> deliveries = new ArrayList<>(records.size());
            for (ChangeEvent<String, String> record : records) {
                RecordHeaders headers = new RecordHeaders();
                for (Header<Object> h : record.headers()) {
                    headers.add(h.getKey(), bytes(h.getValue()));
                }
                deliveries.add(producer.send(new ProducerRecord<>(record.destination(), null, null,
                        bytes(record.key()), bytes(record.value()), headers), (metadata, exception) -> {
                            if (exception != null) {
                                System.err.println("send failed: " + exception);
                            }
                        }));
            }
            try {
                for (int i = 0; i < records.size(); i++) {
                    if (waitTimeoutMs == 0) {
                        deliveries.get(i).get();
                    }
                    else {
                        deliveries.get(i).get(waitTimeoutMs, TimeUnit.MILLISECONDS);
                    }
                    committer.markProcessed(records.get(i));
                }
            }
            catch (ExecutionException | TimeoutException e) {
                throw new RuntimeException("delivery failed; the batch is not marked processed", e);
            }
            committer.markBatchFinished();
        }

        private static byte[] bytes(Object value) {
            if (value == null) {
                return null;
            }
            if (value instanceof byte[] b) {
                return b;
            }
            return value.toString().getBytes(StandardCharsets.UTF_8);
        }
    }
}
