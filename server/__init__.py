"""The longbatch server: gRPC services, SQLite store and batch executor."""
