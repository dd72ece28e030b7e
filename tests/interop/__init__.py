"""Interop with a node we did not write: the lattica SDK (rust-libp2p), in private namespaces."""
