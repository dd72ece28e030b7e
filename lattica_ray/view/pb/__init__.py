"""Generated protobuf code for the cluster view (see README.md)."""
