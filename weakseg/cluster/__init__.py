"""Cluster side of weakseg: checks for `ray up` configs and KubeRay manifests, and a local multi-node Ray."""
