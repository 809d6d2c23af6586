"""The longbatch client library and CLI."""
