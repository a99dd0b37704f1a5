package bench;

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.locks.LockSupport;

/**
 * The workload of benches/throughput.rs (spawn_paced_workload in
 * tests/it/common/mod.rs), over JDBC: `writers` connections insert `rows` rows
 * over `entities` entities, one row per transaction; each transaction bumps
 * its entity's version (locking the entity) and inserts an outbox row with
 * payload {"entity", "seq" = version, "pad" = 200 x "x"}, so per entity the
 * commit order is seq 1, 2, 3... With --rate, each writer ticks every
 * writers/rate seconds (a missed tick delays the next, as tokio's Delay).
 */
final class Workload {
    private Workload() {
    }

    static int run(Main.Opts o) throws Exception {
        String url = o.get("jdbc");
        int rows = (int) o.num("rows");
        int entities = (int) o.num("entities", 1000);
        int writers = (int) o.num("writers", 8);
        double rate = Double.parseDouble(o.get("rate", "0"));
        try (Connection c = DriverManager.getConnection(url); Statement s = c.createStatement()) {
            s.execute("CREATE TABLE IF NOT EXISTS entities (id text PRIMARY KEY, version bigint NOT NULL)");
        }
        String pad = "x".repeat(200);
        // The clock starts once every writer is connected and prepared.
        java.util.concurrent.CyclicBarrier connected = new java.util.concurrent.CyclicBarrier(writers + 1);
        List<Thread> threads = new ArrayList<>();
        Throwable[] failure = {null};
        for (int w = 0; w < writers; w++) {
            final int writer = w;
            final int share = rows / writers + (w < rows % writers ? 1 : 0);
            Thread t = new Thread(() -> {
                try (Connection c = DriverManager.getConnection(url)) {
                    c.setAutoCommit(false);
                    PreparedStatement lock = c.prepareStatement(
                            "INSERT INTO entities (id, version) VALUES (?, 1) "
                                    + "ON CONFLICT (id) DO UPDATE SET version = entities.version + 1 RETURNING version");
                    PreparedStatement insert = c.prepareStatement(
                            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, kind, entity_version, payload) "
                                    + "VALUES ('entity', ?, 'Changed', 'event', ?, ?::jsonb)");
                    connected.await();
                    long intervalNs = rate > 0 ? (long) (writers * 1e9 / rate) : 0;
                    long next = System.nanoTime();
                    for (int i = 0; i < share; i++) {
                        if (intervalNs > 0) {
                            long now = System.nanoTime();
                            if (now < next) {
                                LockSupport.parkNanos(next - now);
                                now = next;
                            }
                            next = now + intervalNs;
                        }
                        String entity = "entity-" + ((i * writers + writer) % entities);
                        lock.setString(1, entity);
                        long version;
                        try (ResultSet r = lock.executeQuery()) {
                            r.next();
                            version = r.getLong(1);
                        }
                        insert.setString(1, entity);
                        insert.setLong(2, version);
                        insert.setString(3, "{\"entity\": \"" + entity + "\", \"pad\": \"" + pad + "\", \"seq\": " + version + "}");
                        insert.executeUpdate();
                        c.commit();
                    }
                }
                catch (Throwable e) {
                    synchronized (failure) {
                        failure[0] = e;
                    }
                }
            }, "writer-" + w);
            t.start();
            threads.add(t);
        }
        connected.await();
        long started = System.nanoTime();
        for (Thread t : threads) {
            t.join();
        }
        if (failure[0] != null) {
            failure[0].printStackTrace();
            return 1;
        }
        double secs = (System.nanoTime() - started) / 1e9;
        System.out.printf("rows=%d seconds=%.3f rate=%.1f%n", rows, secs, rows / secs);
        return 0;
    }
}
