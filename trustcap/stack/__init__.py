"""The local stack: a real Kubernetes API server (kube-apiserver on kine/SQLite), Docker Engine and anvil.

`trustcap stack up` builds the Go tools once into a cache, generates a PKI and kubeconfig, and starts each
part; `down`, `status` and `env` do what they say. With an existing kubeconfig (a real k3s) it uses that.
"""
