"""trustcap.agent: the attestation agent, container executor and verified wipe that run on the HPC."""
