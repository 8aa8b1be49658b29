package io.flightcache.spark.write;

import org.apache.spark.sql.connector.write.WriterCommitMessage;

/** What a task staged: its part id (null if the task had no rows), or that the dataset already exists. */
record StagedPart(String part, boolean exists) implements WriterCommitMessage {}
