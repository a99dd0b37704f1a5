// Prints, for each key read from stdin, the partition the Java client's
// default partitioner picks: BuiltInPartitioner.partitionForKey, i.e.
// toPositive(murmur2(key)) % numPartitions. Run with the broker's jars:
//   java -cp "$RELAY_KAFKA_LIBS/*" tests/java/JavaPartitioner.java 6 < keys
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import org.apache.kafka.common.utils.Utils;

public class JavaPartitioner {
    public static void main(String[] args) throws Exception {
        int partitions = Integer.parseInt(args[0]);
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String key;
        while ((key = in.readLine()) != null) {
            byte[] bytes = key.getBytes(StandardCharsets.UTF_8);
            System.out.println(key + "\t" + Utils.toPositive(Utils.murmur2(bytes)) % partitions);
        }
    }
}
