"""trustcap.gateway: the Pi-side services for its HPC (attestation server, committee relay, egress guard)."""
