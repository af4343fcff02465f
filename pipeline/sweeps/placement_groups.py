"""The one place that reads Ray's placement-group table through Ray's private API.

Why it exists: a trial that Tune stops (ASHA) is killed with its TorchTrainer controller, whose
worker placement group outlives it, because Ray frees a non-detached group only when both its
creator actor and its job have died, and the job is the sweep. Ray Train's own
PlacementGroupCleaner finds the cluster through the state API, which gives up when several Ray
instances run on one machine ("Found multiple active Ray instances"); the stopped trials' CPUs
then stay reserved and the next trials hang. The public table
(``ray.util.placement_group_table``, ``ray.util.state.list_placement_groups``) does not say
whether a group's creator actor has died, so the GCS table is read directly (Ray 2.60:
``ray._private.state`` and ``gcs_pb2``). If a Ray upgrade breaks this, the sweep goes on and
logs a warning (``runner.PlacementGroupReaper``); ``tests/integration/test_tune.py`` checks it.
"""

from __future__ import annotations

import ray
from ray._private.state import state
from ray.core.generated import gcs_pb2
from ray.util.placement_group import PlacementGroup, remove_placement_group


def reap_orphan_placement_groups() -> int:
    """Remove the placement groups whose creator actor died (not detached, not yet removed, not
    created by a driver); returns how many were removed. Needs a connected Ray driver."""
    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        data = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if data.is_detached or not data.creator_actor_dead or data.state == gcs_pb2.PlacementGroupTableData.REMOVED:
            continue
        if not data.creator_actor_id or ray.ActorID(data.creator_actor_id).is_nil():
            continue  # created by a driver (Tune's own trial groups): the job owns it
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(data.placement_group_id)))
        removed += 1
    return removed
