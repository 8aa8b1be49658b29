package io.flightcache.spark.read;

import io.flightcache.spark.protocol.Connection;
import io.flightcache.spark.protocol.FlightcacheException;
import io.flightcache.spark.protocol.Wire;
import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.nio.MappedByteBuffer;
import java.nio.channels.Channels;
import java.nio.channels.FileChannel;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import org.apache.arrow.memory.ArrowBuf;
import org.apache.arrow.memory.BufferAllocator;
import org.apache.arrow.memory.ForeignAllocation;
import org.apache.arrow.memory.util.MemoryUtil;
import org.apache.arrow.vector.FieldVector;
import org.apache.arrow.vector.VectorLoader;
import org.apache.arrow.vector.VectorSchemaRoot;
import org.apache.arrow.vector.compression.CompressionUtil;
import org.apache.arrow.vector.dictionary.DictionaryProvider;
import org.apache.arrow.vector.ipc.ArrowFileReader;
import org.apache.arrow.vector.ipc.ReadChannel;
import org.apache.arrow.vector.ipc.message.ArrowBlock;
import org.apache.arrow.vector.ipc.message.ArrowRecordBatch;
import org.apache.arrow.vector.ipc.message.MessageMetadataResult;
import org.apache.arrow.vector.ipc.message.MessageSerializer;
import org.apache.arrow.vector.types.pojo.Field;
import org.apache.arrow.vector.types.pojo.Schema;

/**
 * The batches of one ticket read from the server's shared memory (protocol §9) instead of streamed: a
 * task on the server's host maps the Arrow IPC files the server keeps in /dev/shm. Each batch is mapped
 * and its vectors point into the mapping (no copy: the pages are the server's, and only the columns Spark
 * touches are ever read); a file with dictionary columns is read with ArrowFileReader instead (one copy),
 * which also loads its dictionaries. Used only for tickets without a filter (the server applies filters);
 * the ticket's columns are picked here.
 */
final class SharedBatches implements AutoCloseable {
  private static final String NONCE_KEY = "flightcache.nonce";

  private final List<FileChannel> channels;
  private final List<ArrowFileReader> readers; // footer, schema, blocks; batches of files with dictionaries
  private final List<VectorSchemaRoot> mapped; // per file: the root mapped batches load into, or null
  private final BufferAllocator allocator;
  private final List<String> columns; // null: every column
  private final int start;
  private final int end;
  private int file; // the file of the current batch
  private int block; // the next block of that file
  private int index; // the version's index of that block
  private List<FieldVector> picked; // the ticket's columns of the current root
  private List<Field> pickedFields;
  private VectorSchemaRoot pickedOf; // the root they belong to

  private SharedBatches(
      List<FileChannel> channels, List<ArrowFileReader> readers, BufferAllocator allocator, List<String> columns,
      int start, int end) throws IOException {
    this.channels = channels;
    this.readers = readers;
    this.allocator = allocator;
    this.columns = columns;
    this.start = start;
    this.end = end;
    this.mapped = new ArrayList<>();
    for (ArrowFileReader r : readers) {
      Schema schema = r.getVectorSchemaRoot().getSchema();
      boolean dictionaries = schema.getFields().stream().anyMatch(SharedBatches::hasDictionary);
      mapped.add(dictionaries ? null : VectorSchemaRoot.create(schema, allocator));
    }
  }

  /**
   * The ticket's batches from shared memory, or null when they cannot be read that way: the ticket has a
   * filter, the server keeps nothing in shared memory, or its files are not on this host (another host,
   * another /dev/shm, a nonce that differs). Null means: stream the ticket, as any client would.
   */
  @SuppressWarnings("unchecked")
  static SharedBatches open(Connection connection, byte[] ticket, BufferAllocator allocator) {
    Map<String, Object> t;
    byte[] body;
    try {
      t = Wire.decode(ticket);
      Object part = t.get("part");
      body = part != null ? Wire.shm((String) part, null) : Wire.shm((String) t.get("name"), ((Number) t.get("version")).longValue());
    } catch (RuntimeException e) { // FlightcacheException for bytes that are not JSON, or missing fields
      return null; // not a ticket this reader understands: its server judges it
    }
    if (t.get("filter") != null || t.get("filter_substrait") != null) {
      return null;
    }
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
    List<FileChannel> channels = new ArrayList<>();
    List<ArrowFileReader> readers = new ArrayList<>();
    try {
      for (Map<String, Object> f : files) {
        FileChannel channel = FileChannel.open(Path.of((String) f.get("path")), StandardOpenOption.READ);
        channels.add(channel);
        ArrowFileReader reader = new ArrowFileReader(channel, allocator);
        readers.add(reader);
        reader.getRecordBlocks(); // reads the footer, whose custom metadata has the nonce
        String nonce = reader.getMetaData().get(NONCE_KEY);
        if (!String.valueOf(f.get("nonce")).equals(nonce)) {
          throw new IOException(f.get("path") + " is not the file the server wrote (nonce differs)");
        }
      }
      List<String> columns = (List<String>) t.get("columns");
      return new SharedBatches(
          channels, readers, allocator, columns, ((Number) t.get("start")).intValue(), ((Number) t.get("end")).intValue());
    } catch (IOException | RuntimeException e) { // not on this host, unlinked meanwhile, or not the server's
      closeAll(readers, List.of());
      return null;
    }
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
      if (mapped.get(file) != null) {
        map(channels.get(file), b, mapped.get(file));
      } else if (!reader.loadRecordBatch(b)) {
        throw new IOException("a shared-memory file ended before its footer said");
      }
      return true;
    }
    return false;
  }

  /**
   * Loads block {@code b} into {@code root} with its buffers pointing into a mapping of the block: the
   * mapping lives as long as a vector holds one of its buffers.
   */
  private void map(FileChannel channel, ArrowBlock b, VectorSchemaRoot root) throws IOException {
    int metadataLength = b.getMetadataLength();
    MappedByteBuffer region =
        channel.map(FileChannel.MapMode.READ_ONLY, b.getOffset(), metadataLength + b.getBodyLength());
    byte[] metadata = new byte[metadataLength];
    region.get(0, metadata);
    MessageMetadataResult message =
        MessageSerializer.readMessage(new ReadChannel(Channels.newChannel(new ByteArrayInputStream(metadata))));
    if (message == null) {
      throw new IOException("a shared-memory file has no record batch where its footer says");
    }
    // The mapping's one reference goes to the batch: deserializeRecordBatch releases the body it is given.
    ArrowBuf whole = allocator.wrapForeignAllocation(new Mapping(region));
    try (ArrowRecordBatch batch =
        MessageSerializer.deserializeRecordBatch(message, whole.slice(metadataLength, b.getBodyLength()))) {
      if (batch.getBodyCompression().getCodec() != CompressionUtil.CodecType.NO_COMPRESSION.getType()) {
        throw new IOException("a shared-memory file is compressed: the server writes none");
      }
      new VectorLoader(root).load(batch); // the vectors retain slices of the mapping
    }
  }

  /** The loaded batch's columns the ticket asks for, over the loaded vectors (no copy). */
  VectorSchemaRoot root() throws IOException {
    VectorSchemaRoot full = mapped.get(file) != null ? mapped.get(file) : readers.get(file).getVectorSchemaRoot();
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
    closeAll(readers, mapped);
  }

  private static void closeAll(List<ArrowFileReader> readers, List<VectorSchemaRoot> roots) {
    for (VectorSchemaRoot root : roots) {
      if (root != null) {
        root.close(); // its vectors let go of the mappings
      }
    }
    for (ArrowFileReader r : readers) {
      try {
        r.close(); // closes its channel and frees what it loaded
      } catch (IOException e) {
        // a read-only file: nothing to flush
      }
    }
  }

  private static boolean hasDictionary(Field f) {
    return f.getDictionary() != null || f.getChildren().stream().anyMatch(SharedBatches::hasDictionary);
  }

  /** A mapped region as Arrow memory. Java unmaps it once unreachable: release only lets go of it. */
  private static final class Mapping extends ForeignAllocation {
    private MappedByteBuffer region;

    Mapping(MappedByteBuffer region) {
      super(region.capacity(), MemoryUtil.getByteBufferAddress(region));
      this.region = region;
    }

    @Override
    protected void release0() {
      region = null;
    }
  }
}
