"""trustcap: trusted execution of digital capsules on Pi gateways with hardware roots of trust.

The core library (this package) holds what every component shares: the trust root, ECVRF and
sortition, sealed capsules, attestation evidence, Merkle proofs and the CLI. The components
(`trustcap.operator`, `trustcap.gateway`, `trustcap.agent`, `trustcap.netboot`) build on it; it
never imports them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
