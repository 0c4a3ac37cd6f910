"""Every kopf handler of the operator, registered by importing this one module.

`python -m trustcap.operator` and `kopf run -m trustcap.operator.handlers` both load it, so neither can
silently miss a controller (the Capsule lifecycle, Gateways on chain, HPCNode enrolment, BootImage
approval, the chain-writer).
"""

from __future__ import annotations

from trustcap.operator import bootimage, capsule, chainwriter, gateway, hpcnode

__all__ = ["bootimage", "capsule", "chainwriter", "gateway", "hpcnode"]
