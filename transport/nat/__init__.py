"""NAT traversal: circuit relay v2, hole punching (DCUtR), reachability (AutoNAT)."""
