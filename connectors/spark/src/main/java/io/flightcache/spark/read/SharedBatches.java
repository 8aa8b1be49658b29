package io.flightcache.spark.read;

import io.flightcache.spark.protocol.Connection;
import io.flightcache.spark.protocol.FlightcacheException;
import io.flightcache.spark.protocol.Wire;
import java.io.IOException;
import java.nio.channels.FileChannel;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import org.apache.arrow.memory.BufferAllocator;
import org.apache.arrow.vector.FieldVector;
import org.apache.arrow.vector.VectorSchemaRoot;
import org.apache.arrow.vector.dictionary.DictionaryProvider;
import org.apache.arrow.vector.ipc.ArrowFileReader;
import org.apache.arrow.vector.ipc.message.ArrowBlock;
import org.apache.arrow.vector.types.pojo.Field;

/**
 * The batches of one ticket read from the server's shared memory (protocol §9) instead of streamed: a
 * task on the server's host reads the Arrow IPC files the server keeps in /dev/shm, one copy from the
 * page cache into the task's allocator, with no Flight stream and no server work per batch. Used only
 * for tickets without a filter (the server applies filters); the ticket's columns are picked here.
 */
final class SharedBatches implements AutoCloseable {
  private static final String NONCE_KEY = "flightcache.nonce";

  private final List<ArrowFileReader> readers;
  private final List<String> columns; // null: every column
  private final int start;
  private final int end;
  private int file; // the reader of the current batch
  private int block; // the next block of that reader
  private int index; // the version's index of that block
  private List<FieldVector> picked; // the ticket's columns of the current reader
  private List<Field> pickedFields;
  private VectorSchemaRoot pickedOf; // the reader root they belong to

  private SharedBatches(List<ArrowFileReader> readers, List<String> columns, int start, int end) {
    this.readers = readers;
    this.columns = columns;
    this.start = start;
    this.end = end;
  }

  /**
   * The ticket's batches from shared memory, or null when they cannot be read that way: the ticket has a
   * filter, the server keeps nothing in shared memory, or its files are not on this host (another host,
   * another /dev/shm, a nonce that differs). Null means: stream the ticket, as any client would.
   */
  @SuppressWarnings("unchecked")
  static SharedBatches open(Connection connection, byte[] ticket, BufferAllocator allocator) {
    Map<String, Object> t = Wire.decode(ticket);
    if (t.get("filter") != null || t.get("filter_substrait") != null) {
      return null;
    }
    Object part = t.get("part");
    byte[] body =
        part != null ? Wire.shm((String) part, null) : Wire.shm((String) t.get("name"), ((Number) t.get("version")).longValue());
    Map<String, Object> answer;
    try {
      answer = connection.action("shm", body, "map from shared memory").get(0);
    } catch (FlightcacheException e) {
      return null; // the stream says what is wrong, if anything is
    }
    List<Map<String, Object>> files = (List<Map<String, Object>>) answer.get("files");
    if (files == null || files.isEmpty()) {
      return null;
    }
    List<ArrowFileReader> readers = new ArrayList<>();
    try {
      for (Map<String, Object> f : files) {
        FileChannel channel = FileChannel.open(Path.of((String) f.get("path")), StandardOpenOption.READ);
        ArrowFileReader reader = new ArrowFileReader(channel, allocator);
        readers.add(reader);
        reader.getRecordBlocks(); // reads the footer, whose custom metadata has the nonce
        String nonce = reader.getMetaData().get(NONCE_KEY);
        if (!String.valueOf(f.get("nonce")).equals(nonce)) {
          throw new IOException(f.get("path") + " is not the file the server wrote (nonce differs)");
        }
      }
    } catch (IOException | RuntimeException e) { // not on this host, unlinked meanwhile, or not the server's
      closeAll(readers);
      return null;
    }
    List<String> columns = (List<String>) t.get("columns");
    return new SharedBatches(
        readers, columns, ((Number) t.get("start")).intValue(), ((Number) t.get("end")).intValue());
  }

  /** Loads the ticket's next batch; false after its last. */
  boolean next() throws IOException {
    while (index < end && file < readers.size()) {
      ArrowFileReader reader = readers.get(file);
      List<ArrowBlock> blocks = reader.getRecordBlocks();
      if (block >= blocks.size()) {
        file++;
        block = 0;
        continue;
      }
      ArrowBlock b = blocks.get(block++);
      if (index++ < start) {
        continue; // before the ticket's range: not read
      }
      if (!reader.loadRecordBatch(b)) {
        throw new IOException("a shared-memory file ended before its footer said");
      }
      return true;
    }
    return false;
  }

  /** The loaded batch's columns the ticket asks for, over the file reader's vectors (no copy). */
  VectorSchemaRoot root() throws IOException {
    VectorSchemaRoot full = readers.get(file).getVectorSchemaRoot();
    if (columns == null) {
      return full;
    }
    if (pickedOf != full) {
      pickedOf = full;
      picked = new ArrayList<>();
      pickedFields = new ArrayList<>();
      for (String c : columns) {
        FieldVector v = full.getVector(c);
        picked.add(v);
        pickedFields.add(v.getField());
      }
    }
    return new VectorSchemaRoot(pickedFields, picked, full.getRowCount());
  }

  List<Field> fields() throws IOException {
    return root().getSchema().getFields();
  }

  DictionaryProvider dictionaries() {
    return readers.get(Math.min(file, readers.size() - 1));
  }

  @Override
  public void close() {
    closeAll(readers);
  }

  private static void closeAll(List<ArrowFileReader> readers) {
    for (ArrowFileReader r : readers) {
      try {
        r.close(); // closes its channel and frees the loaded batch
      } catch (IOException e) {
        // a read-only file: nothing to flush
      }
    }
  }
}
