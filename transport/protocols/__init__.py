"""The basic libp2p protocols every node speaks: ping and identify."""
