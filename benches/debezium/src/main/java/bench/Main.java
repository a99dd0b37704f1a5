package bench;

import java.util.HashMap;
import java.util.Map;

/**
 * Entry point of the Debezium side of `scripts/bench compare`.
 *
 * <pre>
 * engine  --props FILE                     Debezium embedded engine + Kafka sink (the system measured)
 * write   --jdbc URL --rows N [--entities 1000] [--writers 8] [--rate R]
 *                                          the shared workload: one-row transactions, per-entity seq
 * topic   --bootstrap B --topic T [--partitions 6] [--compact true]
 *                                          create a topic (Debezium does not create topics)
 * watch   --bootstrap B --topic T --expect N --out CSV [--timeout-s 900] [--interval-ms 50]
 *                                          samples the sum of the topic's end offsets until N
 * latency --bootstrap B --topic T --expect N --out FILE [--timeout-s 120]
 *                                          consumes new records; seconds from occurred_at to receipt
 * verify  --bootstrap B --topic T --jdbc URL
 *                                          reads the topic to its end offsets: every outbox row's
 *                                          event_id present, per-key seq order of first occurrences
 * </pre>
 */
public final class Main {
    private Main() {
    }

    public static void main(String[] args) throws Exception {
        if (args.length == 0) {
            System.err.println("usage: engine|write|topic|watch|latency|verify [--key value]...");
            System.exit(2);
        }
        Map<String, String> opts = new HashMap<>();
        for (int i = 1; i + 1 < args.length; i += 2) {
            if (!args[i].startsWith("--")) {
                throw new IllegalArgumentException("expected --key value, got " + args[i]);
            }
            opts.put(args[i].substring(2), args[i + 1]);
        }
        Opts o = new Opts(opts);
        int code = switch (args[0]) {
            case "engine" -> Engine.run(o);
            case "write" -> Workload.run(o);
            case "topic" -> Tools.createTopic(o);
            case "watch" -> Tools.watch(o);
            case "latency" -> Tools.latency(o);
            case "verify" -> Verify.run(o);
            default -> throw new IllegalArgumentException("unknown command " + args[0]);
        };
        System.exit(code);
    }

    /** Named options with typed access; a missing required option fails with its name. */
    record Opts(Map<String, String> map) {
        String get(String key) {
            String v = map.get(key);
            if (v == null) {
                throw new IllegalArgumentException("missing --" + key);
            }
            return v;
        }

        String get(String key, String fallback) {
            return map.getOrDefault(key, fallback);
        }

        long num(String key) {
            return Long.parseLong(get(key));
        }

        long num(String key, long fallback) {
            return map.containsKey(key) ? Long.parseLong(map.get(key)) : fallback;
        }
    }
}
