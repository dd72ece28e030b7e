"""Generated protobuf code for the DHT (see README.md)."""
