"""The store's key layout (see DESIGN.md): readable paths under one versioned root."""

from __future__ import annotations

ROOT = "/mesh/v1/"
CONFIG = ROOT + "config/"
WORKLOADS = ROOT + "workloads/"
CSR = ROOT + "csr/"
CERTS = ROOT + "certs/"
CA_BUNDLE = ROOT + "ca/bundle"
CA_CRL = ROOT + "ca/crl"
VIPS = ROOT + "vips/"
# One record per running agent, under the node's lease next to its workloads: its deletion says
# the lease lapsed (the snapshot then holds the node's workloads for a grace period).
NODES = ROOT + "nodes/"
# Kubernetes objects that are not mesh config, mirrored by kube-sync alone (docs/kubernetes.md):
# the agent's pod metadata source reads the Pods, the snapshot the EndpointSlices.
KUBE = ROOT + "kube/"
KUBE_PODS = KUBE + "pods/"
KUBE_ENDPOINT_SLICES = KUBE + "endpointslices/"


def config(kind: str, namespace: str, name: str) -> str:
    return f"{CONFIG}{kind}/{namespace}/{name}"


def workload(node: str, uid: str) -> str:
    return f"{WORKLOADS}{node}/{uid}"


def node_workloads(node: str) -> str:
    return f"{WORKLOADS}{node}/"


def csr(node: str, ident: str) -> str:
    return f"{CSR}{node}/{ident}"


def cert(node: str, ident: str) -> str:
    return f"{CERTS}{node}/{ident}"


def vip(address: str) -> str:
    return f"{VIPS}{address}"


def node(name: str) -> str:
    return f"{NODES}{name}"


def kube_pod(namespace: str, name: str) -> str:
    return f"{KUBE_PODS}{namespace}/{name}"


def endpoint_slice(namespace: str, name: str) -> str:
    return f"{KUBE_ENDPOINT_SLICES}{namespace}/{name}"
