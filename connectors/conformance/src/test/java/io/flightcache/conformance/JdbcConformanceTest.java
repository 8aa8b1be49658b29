package io.flightcache.conformance;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.attribute.PosixFilePermissions;
import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import org.apache.arrow.flight.FlightCallHeaders;
import org.apache.arrow.flight.FlightClient;
import org.apache.arrow.flight.HeaderCallOption;
import org.apache.arrow.flight.Location;
import org.apache.arrow.memory.RootAllocator;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Disabled;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** The Arrow Flight SQL JDBC driver (what BI tools use) against a real server: connect, query, prepare, metadata. */
class JdbcConformanceTest {
  static final String WRITE_TOKEN = "jdbc-conformance-write-token-0123";
  static final String READ_TOKEN = "jdbc-conformance-read-token-01234";

  // The driver logs refused handshakes at SEVERE through java.util.logging; the test of them expects them.
  static final java.util.logging.Logger DRIVER_LOG = java.util.logging.Logger.getLogger("org.apache.arrow.driver.jdbc");

  @TempDir static Path dir;
  static ServerProcess server;

  @BeforeAll
  static void start() throws Exception {
    DRIVER_LOG.setLevel(java.util.logging.Level.OFF);
    Path tokens = dir.resolve("tokens");
    Files.writeString(tokens, WRITE_TOKEN + " write\n" + READ_TOKEN + " read\nbi:bi-password read\n");
    Files.setPosixFilePermissions(tokens, PosixFilePermissions.fromString("rw-------"));
    server = ServerProcess.start("--auth-token-file", tokens.toString());
    // Two datasets, made on the server by the sql action (§15.1) through a plain Flight client.
    try (RootAllocator allocator = new RootAllocator();
        FlightClient client = FlightClient.builder(allocator, Location.forGrpcInsecure(server.host, server.port))
            .build()) {
      FlightCallHeaders headers = new FlightCallHeaders();
      headers.insert("authorization", "Bearer " + WRITE_TOKEN);
      HeaderCallOption write = new HeaderCallOption(headers);
      Wire.action(client, "sql", Map.of("query",
          "SELECT range AS id, CAST(range % 3 AS INTEGER) AS status, 'row-' || range AS name FROM range(100)",
          "into", "jdbc/logs"), write);
      Wire.action(client, "sql", Map.of("query", "SELECT 1.5::DOUBLE AS x, true AS flag", "into", "jdbc/small"),
          write);
    }
  }

  @AfterAll
  static void stop() throws Exception {
    server.close();
  }

  static String url(String params) {
    return "jdbc:arrow-flight-sql://" + server.host + ":" + server.port + "/?useEncryption=false" + params;
  }

  static Connection connect() throws SQLException {
    return DriverManager.getConnection(url("&token=" + READ_TOKEN));
  }

  @Test
  void queryWithABearerToken() throws Exception {
    try (Connection conn = connect(); Statement st = conn.createStatement();
        ResultSet rs = st.executeQuery(
            "SELECT status, count(*) AS n FROM \"jdbc/logs\" GROUP BY status ORDER BY status")) {
      List<String> rows = new ArrayList<>();
      while (rs.next()) {
        rows.add(rs.getInt("status") + ":" + rs.getLong("n"));
      }
      assertEquals(List.of("0:34", "1:33", "2:33"), rows);
    }
  }

  @Test
  void queryWithBasicAuth() throws Exception {
    Properties p = new Properties();
    p.setProperty("user", "bi");
    p.setProperty("password", "bi-password");
    try (Connection conn = DriverManager.getConnection(url(""), p); Statement st = conn.createStatement();
        ResultSet rs = st.executeQuery("SELECT name FROM \"jdbc/logs\" WHERE id = 42")) {
      assertTrue(rs.next());
      assertEquals("row-42", rs.getString(1));
      assertFalse(rs.next());
    }
  }

  @Test
  void wrongCredentialsAreRefused() {
    assertThrows(SQLException.class, () -> DriverManager.getConnection(url("&token=not-a-token-not-a-token")).close());
  }

  @Test
  void preparedStatementWithoutParameters() throws Exception {
    try (Connection conn = connect();
        PreparedStatement ps = conn.prepareStatement("SELECT max(id) AS top FROM \"jdbc/logs\"")) {
      assertEquals("top", ps.getMetaData().getColumnName(1).toLowerCase());
      for (int run = 0; run < 2; run++) { // a prepared statement runs again
        try (ResultSet rs = ps.executeQuery()) {
          assertTrue(rs.next());
          assertEquals(99L, rs.getLong(1));
        }
      }
    }
  }

  // Finding (docs/protocol.md §15.3): CreatePreparedStatement answers no parameter_schema (and no dataset_schema
  // when the query has parameters), so the driver knows of no parameter to bind: "parameter ordinal 1 out of
  // range". Enable this test once the server describes a query's parameters.
  @Disabled("the server sends no parameter_schema for a prepared statement; see docs/protocol.md §15.3")
  @Test
  void preparedStatementWithAParameter() throws Exception {
    try (Connection conn = connect();
        PreparedStatement ps = conn.prepareStatement("SELECT count(*) FROM \"jdbc/logs\" WHERE id < ?")) {
      ps.setLong(1, 10);
      try (ResultSet rs = ps.executeQuery()) {
        assertTrue(rs.next());
        assertEquals(10L, rs.getLong(1));
      }
    }
  }

  @Test
  void badSqlIsAnSqlException() throws Exception {
    try (Connection conn = connect(); Statement st = conn.createStatement()) {
      SQLException e = assertThrows(SQLException.class, () -> st.executeQuery("SELECT * FROM \"jdbc/nowhere\""));
      assertTrue(e.getMessage().contains("jdbc/nowhere"), e.getMessage());
    }
  }

  @Test
  void databaseMetaData() throws Exception {
    try (Connection conn = connect()) {
      DatabaseMetaData meta = conn.getMetaData();
      assertEquals("flightcache", meta.getDatabaseProductName());
      List<String> tables = new ArrayList<>();
      try (ResultSet rs = meta.getTables(null, null, "%", null)) {
        while (rs.next()) {
          assertEquals("main", rs.getString("TABLE_SCHEM"));
          assertEquals("TABLE", rs.getString("TABLE_TYPE"));
          tables.add(rs.getString("TABLE_NAME"));
        }
      }
      assertEquals(List.of("jdbc/logs", "jdbc/small"), tables);
      List<String> columns = new ArrayList<>();
      try (ResultSet rs = meta.getColumns(null, null, "jdbc/logs", null)) {
        while (rs.next()) {
          columns.add(rs.getString("COLUMN_NAME") + ":" + rs.getString("TYPE_NAME"));
        }
      }
      assertEquals(3, columns.size(), columns.toString());
      assertTrue(columns.get(0).startsWith("id:"), columns.toString());
      try (ResultSet rs = meta.getSchemas()) {
        assertTrue(rs.next());
        assertEquals("main", rs.getString("TABLE_SCHEM"));
      }
      try (ResultSet rs = meta.getTableTypes()) {
        assertTrue(rs.next());
        assertEquals("TABLE", rs.getString(1));
      }
    }
  }
}
