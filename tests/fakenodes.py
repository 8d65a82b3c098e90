"""Ray's fake multi-node node provider (the one Ray tests its autoscaler with), with node types that
declare `memory`.

raytl's model actors reserve memory (`embedder.ACTOR_MEMORY`), so the autoscaler must know a node type's
memory to start a node for them: on AWS it fills it in from the instance type, on KubeRay from the pod's
memory limit. Ray's fake provider passes a node type's resources on to `RayParams(resources=...)`, which
refuses `memory` there; this provider keeps `memory` for the autoscaler's planning and lets each fake node
detect its own (this machine's), as `ray start` does.
"""

from __future__ import annotations

from typing import Any

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class MemoryFakeProvider(FakeMultiNodeProvider):
    def create_node_with_resources_and_labels(
        self, node_config: Any, tags: Any, count: int, resources: dict, labels: Any
    ) -> Any:
        resources = {k: v for k, v in resources.items() if k != "memory"}
        return super().create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
