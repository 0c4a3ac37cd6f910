"""trustcap.operator: the kopf operator (Capsule, HPCNode, BootImage, Attestation, Gateway handlers).

Runs on one Pi as leader (kopf peering); talks to the other components only through the Kubernetes
API. Start it with `python -m trustcap.operator` or `kopf run -m trustcap.operator.handlers` (that module
imports every controller).
"""
