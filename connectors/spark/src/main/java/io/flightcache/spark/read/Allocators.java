package io.flightcache.spark.read;

import org.apache.arrow.memory.BufferAllocator;
import org.apache.arrow.memory.RootAllocator;

/** The connector's own root allocator in each JVM; every task and every driver call takes a child of it. */
public final class Allocators {
  private static final RootAllocator ROOT = new RootAllocator(Long.MAX_VALUE);

  private Allocators() {}

  /** Bytes held by every reader, writer and call of this JVM now: 0 when nothing leaks. */
  public static long allocatedMemory() {
    return ROOT.getAllocatedMemory();
  }

  public static BufferAllocator child(String name) {
    return ROOT.newChildAllocator(name, 0, Long.MAX_VALUE);
  }
}
