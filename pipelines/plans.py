"""Joining planned compositions (scenes, crowds) with their member records.

A plan names its members by record key; the graph routes every record to the plan slots that ask
for it, then gathers each plan with its members in slot order.
"""

from __future__ import annotations

from groundforge.filters.verdict import Verdict


def wanted_members(plan):
    """``(record key, (plan id, slot))`` for each member slot of ``plan``."""
    for slot, key in enumerate(plan.members):
        yield key, (plan.scene_id, slot)


def route_members(keyed):
    """Send a record to every plan slot that asked for it."""
    _, grouped = keyed
    for record in grouped["record"]:
        for plan_id, slot in grouped["want"]:
            yield plan_id, (slot, record)


def gather_members(keyed, missing_reason: str) -> Verdict:
    """``(plan, members in slot order)``, or a drop when a member never arrived."""
    _, grouped = keyed
    (plan,) = grouped["plan"]
    members = tuple(record for _, record in sorted(grouped["members"], key=lambda m: m[0]))
    if len(members) != len(plan.members):
        return Verdict.drop(missing_reason, expected=len(plan.members), found=len(members))
    return Verdict.ok((plan, members))
